"""Name and pattern types that the config, the wire protocol and the alert rules share (no imports of ours)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

Glob = Annotated[str, Field(min_length=1, max_length=64)]  # a stream name or event type, or a glob pattern of one
RuleName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")]
