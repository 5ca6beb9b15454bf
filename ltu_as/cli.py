"""`ltu-as`: one-shot questions about an audio file, and model utilities.

    ltu-as ask --audio clip.wav --question "What can be inferred from the audio?"
    ltu-as make-tiny DIR          # tiny random models in the real layouts (tests, demo)
    ltu-as params                 # trainable parameter counts of the real-size model

Exit status: 0 done, 2 bad input (arguments, audio), 3 a model or checkpoint is missing or broken.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import CheckpointError, ModelNotFoundError

log = logging.getLogger("ltu_as.cli")


def _ask_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="ask a question about an audio file; the answer streams to stdout")
    p.add_argument("--audio", required=True, type=Path, help="audio file (anything PyAV decodes)")
    p.add_argument("--question", required=True)
    t = p.add_mutually_exclusive_group()
    t.add_argument("--transcript", help="use this transcript instead of running faster-whisper")
    t.add_argument("--no-transcript", action="store_true", help="ask without a transcript")
    m = p.add_argument_group("models")
    m.add_argument("--checkpoint", help="ltu_as folder, authors' .bin, URL or authors:NAME "
                                        "(default authors:ltuas_long_noqa_a6.bin)")
    m.add_argument("--whisper", help="Whisper encoder: HF folder or hub id (default openai/whisper-large)")
    m.add_argument("--llm", help="LLM: HF folder, hub id or authors:vicuna_ltuas (the default)")
    m.add_argument("--asr-model", default=None, help="faster-whisper model: size name, hub id or CT2 folder "
                                                     "(default large-v2)")
    m.add_argument("--asr-beam-size", type=int, default=5)
    m.add_argument("--asr-max-new-tokens", type=int, default=None, help="cap on transcript tokens per segment")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    m.add_argument("--dtype", default="auto", help="auto (bf16/fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    g = p.add_argument_group("generation (defaults: the reference demo)")
    g.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    g.add_argument("--temperature", type=float, default=0.1)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=500)
    g.add_argument("--repetition-penalty", type=float, default=1.1)
    g.add_argument("--max-new-tokens", type=int, default=500)
    g.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable answers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltu-as", description="LTU-AS joint audio and speech understanding")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _ask_parser(sub)
    tiny = sub.add_parser("make-tiny", help="write tiny random models in the real file layouts")
    tiny.add_argument("directory", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    sub.add_parser("params", help="trainable parameter counts of the real-size model, from its dims")
    return parser


def _cmd_ask(args: argparse.Namespace) -> int:
    from faster_whisper import decode_audio

    from .generation import GenerationOptions
    from .loading import load_model
    from .pipeline import ask_stream
    from .transcribe import DEFAULT_ASR_MODEL, AsrOptions, load_asr, transcribe

    try:
        options = GenerationOptions(
            max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
        )
    except ValueError as e:
        print(f"ltu-as ask: {e}", file=sys.stderr)
        return 2
    if not args.audio.is_file():
        print(f"ltu-as ask: no such audio file: {args.audio}", file=sys.stderr)
        return 2
    try:
        audio = decode_audio(str(args.audio), sampling_rate=16000)
    except Exception as e:  # PyAV raises many error types for unreadable files
        print(f"ltu-as ask: cannot decode {args.audio}: {e}", file=sys.stderr)
        return 2
    if audio.size == 0:
        print(f"ltu-as ask: {args.audio} holds no audio samples", file=sys.stderr)
        return 2
    if args.no_transcript:
        transcript = ""
    elif args.transcript is not None:
        transcript = args.transcript
    else:
        asr = load_asr(args.asr_model or DEFAULT_ASR_MODEL, device="cpu" if args.device == "cpu" else "auto")
        transcript = transcribe(asr, audio, AsrOptions(beam_size=args.asr_beam_size,
                                                       max_new_tokens=args.asr_max_new_tokens))
        log.info("transcript: %r", transcript)
    loaded = load_model(args.checkpoint, whisper=args.whisper, llm=args.llm, device=args.device, dtype=args.dtype)
    for piece in ask_stream(loaded, audio, args.question, transcript, options):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from .testing import build_tiny_models

    tiny = build_tiny_models(args.directory, seed=args.seed)
    print(f"whisper:     {tiny.whisper}\nwhisper-ct2: {tiny.whisper_ct2}\nllm:         {tiny.llm}\n"
          f"checkpoint:  {tiny.checkpoint}")
    return 0


def _cmd_params(_args: argparse.Namespace) -> int:
    from .config import LtuAsConfig, trainable_parameter_counts

    for name, n in trainable_parameter_counts(LtuAsConfig()).items():
        print(f"{name:>10}: {n:>12,}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    commands = {"ask": _cmd_ask, "make-tiny": _cmd_make_tiny, "params": _cmd_params}
    try:
        return commands[args.command](args)
    except (ModelNotFoundError, CheckpointError) as e:
        print(f"ltu-as {args.command}: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
