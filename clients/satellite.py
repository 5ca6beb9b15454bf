"""`ltu-satellite`: stream a local microphone or file to a daemon's remote stream (a light capture box).

    ltu-satellite --stream porch --mic              # default input device, its native rate
    ltu-satellite --stream porch --file talk.flac   # decoded with PyAV, paced in real time

The daemon does the rest (resampling, VAD, ASR); the satellite sends raw s16le PCM at the device's own rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import numpy as np

from .client import DaemonClient, DaemonError


async def _send_file(client: DaemonClient, stream: str, path: str, realtime: bool, block_ms: int) -> None:
    import av

    with av.open(path) as container:
        rate = container.streams.audio[0].rate or 16000
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        await client.start_audio(stream, rate=rate, channels=1)
        t0, sent = time.monotonic(), 0
        block = rate * block_ms // 1000
        buf = b""
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                buf += out.to_ndarray().astype("<i2").tobytes()
            while len(buf) >= 2 * block:
                await client.send_audio(buf[: 2 * block])
                buf, sent = buf[2 * block :], sent + block
                if realtime:
                    await asyncio.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
        if buf:
            await client.send_audio(buf)
        await client.stop_audio()


async def _send_mic(client: DaemonClient, stream: str, device: str | int | None, block_ms: int) -> None:
    import sounddevice as sd

    info = sd.query_devices(device, "input")
    rate = int(info["default_samplerate"])
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=100)  # ~3 s at 30 ms blocks; older blocks win, newer drop
    loop = asyncio.get_running_loop()

    def put(data: bytes) -> None:
        if not queue.full():
            queue.put_nowait(data)

    def callback(indata: np.ndarray, frames: int, _t: object, _s: object) -> None:
        loop.call_soon_threadsafe(put, (np.clip(indata[:, 0], -1, 1) * 32767).astype("<i2").tobytes())

    await client.start_audio(stream, rate=rate, channels=1)
    with sd.InputStream(
        device=device,
        samplerate=rate,
        channels=1,
        dtype="float32",
        blocksize=rate * block_ms // 1000,
        callback=callback,
    ):
        print(f"streaming {info['name']} at {rate} Hz to {stream}", file=sys.stderr)
        while True:
            await client.send_audio(await queue.get())


async def run(args: argparse.Namespace) -> int:
    client = DaemonClient(
        args.url,
        token=args.token or os.environ.get("LTU_DAEMON_TOKEN"),
        events=["error", "audio.*"],
        name=f"ltu-satellite {args.stream}",
    )
    try:
        await client.connect()
    except (OSError, DaemonError) as e:
        print(f"ltu-satellite: cannot connect to {args.url}: {e}", file=sys.stderr)
        return 1
    try:
        if args.file:
            await _send_file(client, args.stream, args.file, not args.fast, args.block_ms)
        else:
            device = int(args.device) if args.device and args.device.isdigit() else args.device
            await _send_mic(client, args.stream, device, args.block_ms)
    finally:
        await client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ltu-satellite", description="stream a microphone or file to ltu-daemon")
    p.add_argument("--url", default="ws://127.0.0.1:8765")
    p.add_argument("--token", help="daemon token (or LTU_DAEMON_TOKEN)")
    p.add_argument("--stream", required=True, help="a remote stream configured on the daemon")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--mic", action="store_true", help="the local microphone")
    src.add_argument("--file", help="an audio file")
    p.add_argument("--device", help="input device (index or name) for --mic")
    p.add_argument("--fast", action="store_true", help="send a file as fast as possible instead of in real time")
    p.add_argument("--block-ms", type=int, default=100)
    try:
        return asyncio.run(run(p.parse_args(argv)))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
