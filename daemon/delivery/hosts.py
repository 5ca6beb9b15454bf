"""Which `Host` headers the daemon's HTTP endpoints answer: a defence against DNS rebinding.

A web page on `evil.example` can make a browser's name for itself resolve to 127.0.0.1 and then read the daemon's
`/healthz` or `/metrics` as if same-origin; its requests still say `Host: evil.example`. So a request is answered
only when its Host is an IP address (a rebinding needs a name), `localhost`, or a name in `server.allowed_hosts`
(the names you reach the daemon by, e.g. `lab.example`). A request without a Host header is not from a browser.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


def host_allowed(host: str | None, allowed: Iterable[str]) -> bool:
    """Whether a request with this `Host` header (port included or not) may be answered."""
    if host is None:
        return True
    name = host.strip().lower()
    if name.startswith("["):  # [::1]:8765
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    if name in ("localhost", "localhost."):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name.rstrip(".") in {a.strip().lower().rstrip(".") for a in allowed}


def refusal(host: str | None) -> str:
    shown = (host or "")[:80].encode("ascii", "replace").decode()
    return (
        f"Host {shown!r} is not allowed: reach the daemon by IP address or localhost, or add the name to "
        "server.allowed_hosts\n"
    )
