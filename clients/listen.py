"""`ltu-listen`: print a daemon's live events.

ltu-listen                          # everything but level events, from ws://127.0.0.1:8765
ltu-listen --events 'transcript.*' --stream kitchen --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from websockets.exceptions import ConnectionClosed

from .client import DaemonClient, DaemonError


def format_event(e: dict[str, Any]) -> str:
    t = e.get("type")
    where = f"[{e.get('stream', '-')}]"
    if t == "transcript.final":
        said = {"no_speech": "(no speech)", "failed": "(not transcribed: the decode failed)"}.get(e.get("outcome", ""))
        return f"{where} FINAL   {e['id']} {e['start']:8.2f}-{e['end']:8.2f}s  {said or repr(e['text'])}"
    if t == "transcript.partial":
        return f"{where} partial {e['id']} {e['start']:8.2f}-{e['end']:8.2f}s  {e['text']!r}"
    if t == "speech.start":
        return f"{where} speech  {e['id']} from {e['start']:.2f}s"
    if t == "level":
        return f"{where} level   {e['rms_dbfs']:7.1f} dBFS rms {e['peak_dbfs']:7.1f} peak"
    if t == "stream.status":
        return f"{where} status  {e['state']}: {e['detail']}"
    if t == "stream.gap":
        return f"{where} GAP     {e['duration_s']:.2f}s at {e['at']:.2f}s ({e['reason']})"
    if t == "window":
        return f"{where} window  {e['id']} {e['start']:8.2f}-{e['end']:8.2f}s  transcript {e['transcript']!r}"
    if t == "scene":
        w = e["window"]
        return (
            f"{where} SCENE   {w['id']} {w['start']:8.2f}-{w['end']:8.2f}s  {e['text']!r}"
            f"  ({e['timings'].get('generate_ms', 0):.0f} ms, {e['skipped']} skipped)"
        )
    if t == "dropped":
        return f"[-] dropped {e['counts']} (this client was too slow)"
    return json.dumps(e)


async def listen(args: argparse.Namespace) -> int:
    events = args.events or ["speech.start", "transcript.*", "stream.*", "window", "scene"]
    client = DaemonClient(
        args.url,
        token=args.token or os.environ.get("LTU_DAEMON_TOKEN"),
        streams=args.stream or ["*"],
        events=events,
        name="ltu-listen",
    )
    try:
        welcome = await client.connect()
    except (OSError, DaemonError) as e:
        print(f"ltu-listen: cannot connect to {args.url}: {e}", file=sys.stderr)
        return 1
    streams = ", ".join(f"{s['name']} ({s['kind']})" for s in welcome["streams"])
    print(
        f"connected to {welcome['server']}: streams {streams}" + ("  [DEMO: random models]" if welcome["demo"] else ""),
        flush=True,
    )
    count = 0
    try:
        async for event in client:
            print(json.dumps(event) if args.json else format_event(event), flush=True)
            count += 1
            if args.count and count >= args.count:
                break
    except ConnectionClosed:
        pass
    code = client.ws.close_code if client.ws else None
    await client.close()
    if code not in (None, 1000) and not (args.count and count >= args.count):
        print(f"ltu-listen: connection closed ({code}: {client.ws.close_reason if client.ws else ''})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ltu-listen", description="print live events from ltu-daemon")
    p.add_argument("--url", default="ws://127.0.0.1:8765")
    p.add_argument("--token", help="daemon token (or LTU_DAEMON_TOKEN)")
    p.add_argument("--stream", action="append", help="only this stream (repeatable; glob patterns)")
    p.add_argument("--events", action="append", help="event types (repeatable; glob patterns; default: all but level)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", type=int, default=0, help="exit after this many messages")
    try:
        return asyncio.run(listen(p.parse_args(argv)))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
