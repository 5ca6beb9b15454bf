"""`ltu-ask`: ask the daemon a question about what it hears; the answer streams to stdout.

    ltu-ask "What can be inferred from the audio?"            # the newest window of the first stream
    ltu-ask "Is the dog barking?" --stream kitchen --window kitchen:w42
    ltu-ask "What was that noise?" --stream kitchen --at 3600.5 --greedy

Timings (queue wait, time to first token, tokens/s) and the window used go to stderr. Exit status: 0 answered,
1 cannot connect, 2 the daemon refused the question (the message says why; `busy` says when to retry).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

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
    options = {"greedy": args.greedy, "temperature": args.temperature}
    if args.max_new_tokens:
        options["max_new_tokens"] = args.max_new_tokens
    if args.seed is not None:
        options["seed"] = args.seed
    try:
        async for event in client.ask(args.question, stream=args.stream, window=args.window, at=args.at, **options):
            if event["type"] == "answer.start":
                w = event["window"]
                print(f"[{w['id']} {w['start']:.1f}-{w['end']:.1f}s, transcript {w['transcript']!r}]", file=sys.stderr)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ltu-ask", description="ask ltu-daemon about what it hears")
    p.add_argument("question")
    p.add_argument("--url", default="ws://127.0.0.1:8765")
    p.add_argument("--token", help="daemon token (or LTU_DAEMON_TOKEN)")
    p.add_argument("--stream", help="stream name (default: the first with a window)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--window", help="a window id from `window` events, e.g. kitchen:w42")
    scope.add_argument("--at", type=float, help="a time on the stream clock, s")
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
