"""ltu-daemon: the service that composes `ltu_as` with live audio sources, VAD, streaming ASR and websockets.

Start it with `ltu-daemon start` (see `daemon.cli`); the pieces are one module each: config, audio, sources, ring,
level, vad, asr, stream, bus, protocol, server, service, demo.
"""

__version__ = "0.1.0"
