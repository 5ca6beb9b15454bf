"""`ltu-as`: one-shot questions about an audio file, and model utilities.

    ltu-as ask --audio clip.wav --question "What can be inferred from the audio?"
    ltu-as make-tiny DIR          # tiny random models in the real layouts (tests, demo)
    ltu-as params                 # trainable parameter counts of the real-size model
    ltu-as export-llm CKPT OUT    # the LLM (LoRA merged, adapter, base) as folders a vLLM server serves
    ltu-as dataset from-folders DIR --out train.json --held-out-out test.json   # your own labelled clips

Exit status: 0 done, 2 bad input (arguments, audio), 3 a model or checkpoint is missing or broken.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError, ModelNotFoundError

if TYPE_CHECKING:
    from .loading.load import LoadedModel
    from .training.data import Record

log = logging.getLogger("ltu_as.cli")


def _ask_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="ask a question about an audio file; the answer streams to stdout")
    p.add_argument("--audio", required=True, type=Path, help="audio file (anything PyAV decodes)")
    p.add_argument(
        "--question",
        help="what to ask (default: the question a fine-tuned checkpoint was trained on, from its ltu_as_trained.json)",
    )
    t = p.add_mutually_exclusive_group()
    t.add_argument("--transcript", help="use this transcript instead of running faster-whisper")
    t.add_argument("--no-transcript", action="store_true", help="ask without a transcript")
    m = p.add_argument_group("models")
    m.add_argument(
        "--checkpoint",
        help="ltu_as folder, authors' .bin, URL or authors:NAME (default authors:ltuas_long_noqa_a6.bin)",
    )
    m.add_argument("--whisper", help="Whisper encoder: HF folder or hub id (default openai/whisper-large)")
    m.add_argument("--llm", help="LLM: HF folder, hub id or authors:vicuna_ltuas (the default)")
    m.add_argument(
        "--asr-model", default=None, help="faster-whisper model: size name, hub id or CT2 folder (default large-v2)"
    )
    m.add_argument("--asr-beam-size", type=int, default=5)
    m.add_argument("--asr-max-new-tokens", type=int, default=None, help="cap on transcript tokens per segment")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    m.add_argument("--dtype", default="auto", help="auto (bf16/fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    m.add_argument(
        "--quantization",
        default="none",
        choices=("none", "int8", "int4"),
        help="LLM weights for this run: LoRA merged, then int8 or int4 (on CPU the LLM then computes in bf16)",
    )
    m.add_argument(
        "--encoder-quantization",
        default="none",
        choices=("none", "int8"),
        help="the Whisper encoder's linear layers in int8, as the daemon's model.encoder_quantization",
    )
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
    tiny.add_argument(
        "--llm-heads", type=int, default=None, help="attention heads of the tiny LLaMA (2: head size 32, as vLLM needs)"
    )
    tiny.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="a text file (one answer per line, or an Open-ASQA .json/.jsonl whose outputs are used): the tiny "
        "tokenizer learns these words, so answers are a few tokens as with a real vocabulary",
    )
    ds = sub.add_parser("dataset", help="build Open-ASQA data files")
    dsub = ds.add_subparsers(dest="dataset_command", required=True)
    ff = dsub.add_parser("from-folders", help="a folder of class folders of clips → train and held-out .json")
    ff.add_argument("root", type=Path, help="ROOT/<class>/*.wav ...; answer = folder name, or its answer.txt")
    ff.add_argument("--out", type=Path, required=True, help="the training records (.json)")
    ff.add_argument("--held-out-out", type=Path, default=None, help="the held-out records (.json)")
    ff.add_argument("--held-out", type=float, default=0.2, help="share of each class held out (default 0.2)")
    ff.add_argument("--question", default="What sound is this?")
    ff.add_argument("--dataset-name", default="my_sounds")
    ff.add_argument("--seed", type=int, default=0)
    sub.add_parser("params", help="trainable parameter counts of the real-size model, from its dims")
    _export_parser(sub)
    _training_parsers(sub)
    return parser


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-llm",
        help="write the LLM as vLLM-servable folders: merged/ (LoRA folded in), adapter/ + base/, export.json",
    )
    p.add_argument("checkpoint", help="ltu_as folder, authors' .bin, URL or authors:NAME")
    p.add_argument("out", type=Path, help="export folder (missing or empty, unless --overwrite)")
    p.add_argument("--whisper", help="Whisper encoder: HF folder or hub id (default: as recorded/openai)")
    p.add_argument("--llm", help="LLM: HF folder, hub id or authors:vicuna_ltuas (default: as recorded)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="weights on disk (fp32)")
    p.add_argument("--parts", default="merged,adapter,base", help="comma-separated subset of merged,adapter,base")
    p.add_argument("--overwrite", action="store_true", help="replace the parts of an earlier export in OUT")


def _training_parsers(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("extract-features", help="precompute [L, T, D] Whisper features for every audio file")
    ex.add_argument("--data", required=True, type=Path, help="Open-ASQA-format .json or .jsonl")
    ex.add_argument("--audio-root", required=True, type=Path, help="folder the audio ids are relative to")
    ex.add_argument("--out", required=True, type=Path)
    ex.add_argument("--whisper", default="openai/whisper-large", help="HF Whisper folder or hub id (large-v1)")
    ex.add_argument("--device", default="auto")
    ex.add_argument("--dtype", default="auto")
    ex.add_argument("--batch-size", type=int, default=8)
    ex.add_argument(
        "--retry-failed", action="store_true", help="try again the files whose extraction failed before (fixed since)"
    )
    tr = sub.add_parser("train", help="one stage of the LTU-AS curriculum")
    tr.add_argument("--stage", type=int, choices=(1, 2, 3), required=True)
    tr.add_argument("--config", type=Path, help="stage config (default: the shipped stage<N>.toml, see --print-config)")
    tr.add_argument(
        "--preset",
        choices=("fine-tune",),
        help="fine-tune: the shipped config for small datasets of your own (stage 2's parts, EOS, warm-up 10 %%)",
    )
    tr.add_argument("--print-config", action="store_true", help="print the resolved config and its file; exit")
    tr.add_argument("--data", type=Path, help="Open-ASQA-format .json or .jsonl (required to train)")
    tr.add_argument("--features", type=Path, help="feature store from extract-features (required to train)")
    tr.add_argument("--out", type=Path, help="output folder (required to train)")
    tr.add_argument("--init", help="the previous stage's output folder, or an authors' .bin (stage 1: optional)")
    tr.add_argument("--whisper", help="Whisper folder/hub id (default: recorded in --init, else openai/whisper-large)")
    tr.add_argument("--llm", help="LLM folder/hub id (default: recorded in --init, else authors:vicuna_ltuas)")
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    tr.add_argument(
        "--overwrite", action="store_true", help="delete another run's checkpoints in --out and start afresh"
    )
    tr.add_argument("--strict", action="store_true", help="refuse data with bad rows, cut answers or missing features")
    tr.add_argument(
        "--from-scratch", action="store_true", help="stage 2/3 without --init: a fresh TLTR and projector, on purpose"
    )
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    tr.add_argument("--device", default="auto")
    tr.add_argument("--dtype", default="auto")
    ev = sub.add_parser("eval", help="closed-ended evaluation, scored as in the paper")
    ev.add_argument("--data", required=True, type=Path, help="benchmark records (.json/.jsonl)")
    ev.add_argument("--features", required=True, type=Path)
    ev.add_argument("--checkpoint", required=True, help="save_pretrained folder or authors' .bin")
    ev.add_argument("--whisper")
    ev.add_argument("--llm")
    ev.add_argument("--out", required=True, type=Path, help="report path; .json and .md are written")
    ev.add_argument("--max-new-tokens", type=int, default=32)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--dtype", default="auto")
    ev.add_argument(
        "--quantization",
        default="none",
        choices=("none", "int8", "int4"),
        help="evaluate with quantized LLM weights (LoRA merged first), as the daemon's model.quantization",
    )


class UserError(Exception):
    """A mistake in what the user gave (a file that cannot be read as data): one line on stderr, exit status 2."""


def _read_data(path: Path) -> tuple[list[Record], int]:
    from .training.data import read_records

    try:
        records, bad = read_records(path)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from e
    for b in bad[:20]:
        log.warning("%s %s: %s", path, b.where, b.reason)
    if bad:
        log.warning("%d bad record(s) in %s skipped (listed above, first 20)", len(bad), path)
    log.info("%d records from %s", len(records), path)
    return records, len(bad)


def _cmd_extract(args: argparse.Namespace) -> int:
    from .training.featurestore import FeatureEncoder, extract_features

    records, _ = _read_data(args.data)
    store = extract_features(
        FeatureEncoder(args.whisper, args.device, args.dtype),
        [r.audio_id for r in records],
        args.audio_root,
        args.out,
        batch_size=args.batch_size,
        retry_failed=args.retry_failed,
    )
    print(
        f"{len(store.manifest['files'])} feature files in {args.out}; {len(store.failed)} failed"
        + (f" (see {args.out}/manifest.json; fix them, then run again with --retry-failed)" if store.failed else "")
    )
    return 1 if store.failed else 0


def _model_for(args: argparse.Namespace, init: str | None, seed: int) -> LoadedModel:
    import torch

    local_rank = os.environ.get("LOCAL_RANK")  # set by torchrun and accelerate launch: one GPU per process
    if local_rank is not None and args.device in ("auto", "cuda") and torch.cuda.is_available():
        args.device = f"cuda:{int(local_rank)}"

    from .loading.load import LoadedModel, load_components, load_model, load_pretrained
    from .model.processor import LtuAsProcessor

    if init and Path(init).is_dir():
        model = load_pretrained(init, whisper=args.whisper, llm=args.llm, device=args.device, dtype=args.dtype)
    elif init:
        model = load_model(init, whisper=args.whisper, llm=args.llm, device=args.device, dtype=args.dtype).model
    else:
        torch.manual_seed(seed)  # the fresh TLTR and projector
        model = load_components(whisper=args.whisper, llm=args.llm, device=args.device, dtype=args.dtype)
    return LoadedModel(model, LtuAsProcessor.from_pretrained(model.llm.name_or_path, model.config))


def _cmd_train(args: argparse.Namespace) -> int:
    from .training.featurestore import FeatureStore, same_encoder
    from .training.trainer import STAGES, RunError, TrainConfig, Trainer, check_out, make_examples, seed_everything

    if args.preset and args.config:
        print("ltu-as train: give --preset or --config, not both", file=sys.stderr)
        return 2
    path = args.config or STAGES / ("finetune.toml" if args.preset == "fine-tune" else f"stage{args.stage}.toml")
    if not path.is_file():
        why = "" if args.config else " (the shipped stage configs are missing: reinstall ltu-daemon)"
        print(f"ltu-as train: stage config {path} does not exist{why}", file=sys.stderr)
        return 2
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = value
    try:
        cfg = TrainConfig.load(path, {"stage": args.stage, **overrides})
    except (ValueError, TypeError) as e:
        print(f"ltu-as train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(f"# {path}" + (f" with --set {' '.join(args.set)}" if args.set else ""))
        print(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
        return 0
    missing_args = [f"--{n}" for n in ("data", "features", "out") if getattr(args, n) is None]
    if missing_args:
        print(f"ltu-as train: {', '.join(missing_args)} required to train", file=sys.stderr)
        return 2
    try:
        # with several processes only the first deletes; all of them refuse alike
        check_out(args.out, resume=args.resume, overwrite=args.overwrite, delete=os.environ.get("RANK", "0") == "0")
    except RunError as e:
        print(f"ltu-as train: {e}", file=sys.stderr)
        return 2
    if args.stage > 1 and not args.init and not args.from_scratch:
        print(
            f"ltu-as train: stage {args.stage} starts from stage {args.stage - 1}'s output: pass --init FOLDER "
            "(or an authors' .bin), or --from-scratch to train a fresh TLTR and projector on purpose",
            file=sys.stderr,
        )
        return 2
    records, bad_rows = _read_data(args.data)
    store = FeatureStore(args.features)
    seed_everything(cfg.seed)  # everything from here on (a fresh TLTR, LoRA's init) follows from the config
    loaded = _model_for(args, args.init, cfg.seed)
    made_with = store.manifest.get("meta", {})
    model_cfg = loaded.model.config
    if made_with.get("feature_shape") and list(made_with["feature_shape"]) != list(model_cfg.feature_shape):
        print(
            f"ltu-as train: the features in {args.features} are {made_with['feature_shape']}, the model reads "
            f"{list(model_cfg.feature_shape)}: extract them again with the model's Whisper",
            file=sys.stderr,
        )
        return 2
    if made_with.get("encoder") and not same_encoder(made_with["encoder"], model_cfg.whisper_source):
        print(
            f"ltu-as train: the features in {args.features} were made with the Whisper encoder "
            f"{made_with['encoder']!r}, the model uses {model_cfg.whisper_source!r}: extract them again with "
            f"--whisper {model_cfg.whisper_source}, or train with --whisper {made_with['encoder']}",
            file=sys.stderr,
        )
        return 2
    examples, report = make_examples(loaded.processor, records, store, cfg.cutoff_len, cfg.loss, cfg.eos)
    problems = report.problems(cfg.cutoff_len)
    for problem in problems:
        log.warning("%s", problem)
    if args.strict and (bad_rows or problems):
        print("ltu-as train: --strict: the data has the problems above; fix them or drop --strict", file=sys.stderr)
        return 2
    if not examples:
        print(f"ltu-as train: no example to train on in {args.data} (see the warnings above)", file=sys.stderr)
        return 2
    trainer = Trainer(loaded.model, loaded.processor, examples, store, cfg, args.out)
    log.info(
        "stage %d: training %s (%s parameters); %d examples, %d steps of %d",
        cfg.stage,
        ", ".join(trainer.counts),
        f"{sum(trainer.counts.values()):,}",
        len(examples),
        trainer.total_steps,
        trainer.rows_per_step,
    )
    try:
        if args.resume and not trainer.resume():
            log.info("no checkpoint in %s: starting from the beginning", args.out)
    except RunError as e:
        print(f"ltu-as train: {e}", file=sys.stderr)
        return 2
    stops = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
    previous = {
        sig: signal.signal(sig, lambda n, _f: trainer.stop(f"{stops[signal.Signals(n)]} received")) for sig in stops
    }
    try:
        losses = trainer.train()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if trainer.stopped:
        print(
            f"stage {cfg.stage} stopped at step {trainer.step} of {trainer.total_steps}; checkpoint saved: "
            f"continue with the same command and --resume",
            file=sys.stderr,
        )
        return 130 if "SIGINT" in (trainer.stop_reason or "") else 143
    folder, official = trainer.finish()
    if os.environ.get("RANK", "0") == "0":
        from .loading.card import TrainedOn

        used = {e.audio_id for e in examples}
        trained = TrainedOn.from_records([r for r in records if r.audio_id in used], trainer.total_steps, cfg.eos)
        trained.save(folder)
    if losses:
        log.info("final loss %.4f", losses[-1])
    if os.environ.get("RANK", "0") == "0":
        print(f"stage {cfg.stage} done: {folder} (ltu_as) and {official} (authors' layout)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .training.evaluation import generate_answers, score, write_report
    from .training.featurestore import FeatureStore

    records, _ = _read_data(args.data)
    store = FeatureStore(args.features)
    kept = [r for r in records if r.audio_id in store]
    if len(kept) < len(records):
        log.warning("%d record(s) without features are not scored", len(records) - len(kept))
    loaded = _model_for(args, args.checkpoint, 0)
    if args.quantization != "none":
        from .loading.load import quantize_for_inference

        quantize_for_inference(loaded.model, args.quantization)
    answers = generate_answers(loaded, kept, store, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    results = score(kept, answers)
    js, md = write_report(results, args.out)
    with open(js.with_name(js.stem + ".answers.jsonl"), "w") as f:
        for r, a in zip(kept, answers, strict=True):
            f.write(
                json.dumps({"audio_id": r.audio_id, "dataset": r.dataset, "answer": a, "reference": r.output}) + "\n"
            )
    print(md.read_text(), end="")
    return 0


def _cmd_ask(args: argparse.Namespace) -> int:
    from faster_whisper import decode_audio

    from .loading.load import load_model
    from .model.generation import GenerationOptions
    from .serving.pipeline import ask_stream
    from .serving.transcribe import DEFAULT_ASR_MODEL, AsrOptions, load_asr, transcribe

    try:
        options = GenerationOptions(
            max_new_tokens=args.max_new_tokens,
            do_sample=not args.greedy,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
        )
    except ValueError as e:
        print(f"ltu-as ask: {e}", file=sys.stderr)
        return 2
    if not args.audio.is_file():
        print(f"ltu-as ask: no such audio file: {args.audio}", file=sys.stderr)
        return 2
    from .loading.card import TrainedOn

    trained = TrainedOn.load(args.checkpoint) if args.checkpoint and Path(args.checkpoint).is_dir() else None
    question = args.question or (trained.question if trained else None)
    if question is None:
        print(
            "ltu-as ask: --question is needed (this checkpoint records no question it was trained on)", file=sys.stderr
        )
        return 2
    if trained and question not in trained.questions:
        log.warning(
            "%s was trained on %s; a small fine-tune answers other questions badly",
            args.checkpoint,
            " / ".join(repr(q) for q in trained.questions[:3]),
        )
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
        transcript = transcribe(
            asr, audio, AsrOptions(beam_size=args.asr_beam_size, max_new_tokens=args.asr_max_new_tokens)
        )
        log.info("transcript: %r", transcript)
    loaded = load_model(
        args.checkpoint,
        whisper=args.whisper,
        llm=args.llm,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        encoder_quantization=args.encoder_quantization,
    )
    for piece in ask_stream(loaded, audio, question, transcript, options):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _cmd_dataset(args: argparse.Namespace) -> int:
    from .training.folders import from_folders

    try:
        found = from_folders(
            args.root, question=args.question, held_out=args.held_out, seed=args.seed, dataset=args.dataset_name
        )
    except ValueError as e:
        raise UserError(str(e)) from e
    if found.held_out and args.held_out_out is None:
        raise UserError("--held-out-out FILE is needed for the held-out records (or --held-out 0)")
    for path, records in ((args.out, found.train), (args.held_out_out, found.held_out)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps([dataclasses.asdict(r) for r in records], indent=1))
    for p in found.skipped[:10]:
        log.warning("not an audio file, skipped: %s", p)
    for folder, answer in found.answers.items():
        n = sum(r.output == answer for r in found.train)
        print(f"{folder:<24} {answer!r}: {n} train, {sum(r.output == answer for r in found.held_out)} held out")
    print(
        f"{args.out}: {len(found.train)} records"
        + (f"; {args.held_out_out}: {len(found.held_out)}" if found.held_out else "")
    )
    print(f"audio ids are relative to {args.root}: pass --audio-root {args.root} to extract-features")
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from .testing import build_tiny_models

    labels = None
    if args.labels is not None:
        if args.labels.suffix in (".json", ".jsonl"):
            labels = sorted({r.output for r in _read_data(args.labels)[0]})
        else:
            try:
                labels = [line.strip() for line in args.labels.read_text().splitlines() if line.strip()]
            except OSError as e:
                raise UserError(f"cannot read --labels {args.labels}: {e}") from e
    tiny = build_tiny_models(args.directory, seed=args.seed, llm_heads=args.llm_heads, labels=labels)
    print(
        f"whisper:     {tiny.whisper}\nwhisper-ct2: {tiny.whisper_ct2}\nllm:         {tiny.llm}\n"
        f"checkpoint:  {tiny.checkpoint}"
    )
    return 0


def _missing_local(source: str) -> bool:
    """A checkpoint argument that can only be a local path (as `resolve` decides), and that does not exist."""
    from .loading.sources import is_remote

    return not is_remote(source) and not Path(source).expanduser().exists()


def _cmd_export_llm(args: argparse.Namespace) -> int:
    from .loading.export import ExportError, export_llm

    if _missing_local(args.checkpoint):
        print(f"ltu-as export-llm: no such checkpoint: {args.checkpoint}", file=sys.stderr)
        return 2
    try:
        manifest = export_llm(
            args.checkpoint,
            args.out,
            whisper=args.whisper,
            llm=args.llm,
            dtype=args.dtype,
            parts=args.parts,
            overwrite=args.overwrite,
        )
    except ExportError as e:
        print(f"ltu-as export-llm: {e}", file=sys.stderr)
        return 2
    for part, folder in manifest["parts"].items():
        print(f"{part + ':':<10}{folder}")
    print(f"{'manifest:':<10}{Path(args.out).expanduser().resolve() / 'export.json'}")
    if manifest["vllm_command"]:
        print(f"serve with:\n  {manifest['vllm_command']}")
    return 0


def _cmd_params(_args: argparse.Namespace) -> int:
    from .model.config import LtuAsConfig, trainable_parameter_counts

    for name, n in trainable_parameter_counts(LtuAsConfig()).items():
        print(f"{name:>10}: {n:>12,}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .logs import quiet_imports

    quiet_imports()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    commands = {
        "ask": _cmd_ask,
        "make-tiny": _cmd_make_tiny,
        "dataset": _cmd_dataset,
        "params": _cmd_params,
        "export-llm": _cmd_export_llm,
        "extract-features": _cmd_extract,
        "train": _cmd_train,
        "eval": _cmd_eval,
    }
    try:
        return commands[args.command](args)
    except UserError as e:
        print(f"ltu-as {args.command}: {e}", file=sys.stderr)
        return 2
    except (ModelNotFoundError, CheckpointError) as e:
        print(f"ltu-as {args.command}: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
