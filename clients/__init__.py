"""Reference clients for ltu-daemon: `DaemonClient` (async library), `ltu-listen`, `ltu-satellite`."""

from .client import DaemonClient, DaemonError

__all__ = ["DaemonClient", "DaemonError"]
