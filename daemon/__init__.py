"""ltu-daemon: the service that composes `ltu_as` with live audio sources, VAD, streaming ASR and websockets.

Start it with `ltu-daemon start` (see `daemon.cli`). The subpackages follow the data flow:

    capture/        sources, audio ring, level meter, VAD                  (audio in)
    speech/         the ASR worker                                          (transcripts)
    understanding/  windows, feature cache, scheduler, model worker, question desk
    delivery/       protocol models, event bus, websocket server            (out to clients)

and at the top: `config` (the one typed tree), `clock` (sample rate and window, from the model), `reply` (results
from worker threads back to the loop), `stream` (one stream's pipeline), `service` (the composition root), `cli`
and `demo`.
"""

__version__ = "0.1.0"
