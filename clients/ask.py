"""`ltu-ask`: ask the daemon a question about what it hears; the answer streams to stdout.

    ltu-ask "What can be inferred from the audio?"            # the newest window of the first stream
    ltu-ask "Is the dog barking?" --stream kitchen --window kitchen:w42
    ltu-ask "What was that noise?" --stream kitchen --at 3600.5 --greedy
    ltu-ask --since 2h "When did the washing machine finish?"  # the stored past: the last two hours
    ltu-ask --since 02:00 --until 06:00 --stream garage "What happened?"
    ltu-ask --auto "Did anyone mention the router today?"       # the daemon decides: now or the past

Timings (queue wait, time to first token, tokens/s) and the window or stored windows used go to stderr. Exit
status: 0 answered, 1 cannot connect, 2 the daemon refused the question (the message says why; `busy` says when to
retry).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from datetime import datetime

from .client import DaemonClient, DaemonError


async def run(args: argparse.Namespace) -> int:
    client = DaemonClient(
        args.url, token=args.token or os.environ.get("LTU_DAEMON_TOKEN"), streams=["-"], events=["-"], name="ltu-ask"
    )
    try:
        await client.connect()
    except (OSError, DaemonError) as e:
        print(f"ltu-ask: cannot connect to {args.url}: {e}", file=sys.stderr)
        return 1
    options: dict[str, object] = {"greedy": args.greedy, "temperature": args.temperature}
    if args.since is not None or args.until is not None or args.history:
        options["scope"] = "history"
        for key in ("since", "until"):
            if getattr(args, key) is not None:
                options[key] = getattr(args, key)
    elif args.auto:
        options["scope"] = "auto"
    if args.max_new_tokens:
        options["max_new_tokens"] = args.max_new_tokens
    if args.seed is not None:
        options["seed"] = args.seed
    try:
        async for event in client.ask(args.question, stream=args.stream, window=args.window, at=args.at, **options):
            if event["type"] == "answer.start":
                w = event["window"]
                if w is not None:
                    print(
                        f"[{w['id']} {w['start']:.1f}-{w['end']:.1f}s, transcript {w['transcript']!r}]", file=sys.stderr
                    )
                else:
                    cited = ", ".join(f"{e['id']} ({_clock(e['wall_start'])})" for e in event["evidence"]) or "none"
                    print(f"[from the history: {cited}]", file=sys.stderr)
            elif event["type"] == "answer.delta":
                print(event["text"], end="", flush=True)
            elif event["type"] == "answer.done":
                t = event["timings"]
                print()
                print(
                    f"[{event['tokens']} tokens, {event['reason']}; queue {t['queue_ms']} ms, first token "
                    f"{t['ttft_ms']} ms, {t['tokens_per_s']} tokens/s]",
                    file=sys.stderr,
                )
            else:
                hint = f" (retry in {event['retry_after_s']:g} s)" if event.get("retry_after_s") else ""
                print(f"ltu-ask: {event['code']}: {event['message']}{hint}", file=sys.stderr)
                return 2
    finally:
        await client.close()
    return 0


def _clock(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%d %b %H:%M:%S") if t else "?"


def when(text: str) -> float:
    """A time for --since/--until: a duration ago (`90s`, `30m`, `2h`, `1d`), a time of day today (`02:00`,
    yesterday if that is still to come), or an ISO date-time (`2026-11-26T02:00`). Unix time, s."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if m:
        return time.time() - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text.strip())
    if m:
        now = datetime.now()
        t = now.replace(hour=int(m.group(1)), minute=int(m.group(2)), second=0, microsecond=0)
        return t.timestamp() - (86400 if t > now else 0)
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use 2h, 30m, 02:00 or 2026-11-26T02:00") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ltu-ask", description="ask ltu-daemon about what it hears")
    p.add_argument("question")
    p.add_argument("--url", default="ws://127.0.0.1:8765")
    p.add_argument("--token", help="daemon token (or LTU_DAEMON_TOKEN)")
    p.add_argument("--stream", help="stream name (default: the first with a window)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--window", help="a window id from `window` events, e.g. kitchen:w42")
    scope.add_argument("--at", type=float, help="a time on the stream clock, s")
    scope.add_argument("--since", type=when, help="ask the stored past from then: 2h, 30m, 02:00, ISO date-time")
    scope.add_argument("--history", action="store_true", help="ask the stored past (the last history.since_h)")
    scope.add_argument("--auto", action="store_true", help="let the daemon choose: now or the past")
    p.add_argument("--until", type=when, help="with --since: up to then (default: now)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (default: the reference's sampling)")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--seed", type=int)
    try:
        return asyncio.run(run(p.parse_args(argv)))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
