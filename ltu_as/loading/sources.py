"""Where model components come from: a local path, a Hugging Face hub id, an URL, or a named authors' release.

Downloads land once in a cache (`$LTU_AS_CACHE`, default `~/.cache/ltu_as`; hub files in the usual
huggingface_hub cache), show progress bars, resume after an interruption, and are verified (size, and sha256
where known). Offline or missing → `ModelNotFoundError` naming what is missing and how to provide it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from tqdm.auto import tqdm

from ..errors import ModelNotFoundError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Release:
    """A file or folder from the LTU-AS authors' release (their README and `prep_train.sh`)."""

    urls: tuple[str, ...]
    kind: str  # "file": one file; "folder": zip archives extracted over each other into one folder
    sha256: str | None = None


_DBX = "https://www.dropbox.com/scl"
AUTHORS_RELEASES: dict[str, Release] = {
    # Default checkpoint: fp16 features from A5000/A6000-class GPUs, 192-token training sequences.
    "ltuas_long_noqa_a6.bin": Release(
        (f"{_DBX}/fi/ryoqai0ayt45k07ib71yt/ltuas_long_noqa_a6.bin?rlkey=1ivttmj8uorf63dptbdd6qb2i&dl=1",), "file"
    ),
    "ltuas_long_noqa_old_gpu.bin": Release(
        (f"{_DBX}/fi/co2m4ljyxym7f3w3dl6u4/ltuas_long_noqa_old_gpu.bin?rlkey=23sxa0f6l98wbci4t67y0se7v&dl=1",), "file"
    ),
    "ltuas_ori_paper.bin": Release(
        (f"{_DBX}/fi/34y1p8bfuwlcdepwd2e1o/ltuas_ori_paper.bin?rlkey=um20nlxzng1nig9o4ib2difoo&dl=1",), "file"
    ),
    # Vicuna-7B as the authors ship it: the `vicuna` weights plus the `vicuna_ltuas` config/tokenizer folder.
    "vicuna_ltuas": Release(
        (
            f"{_DBX}/fo/mjn5wdnc1j67kkhbu0j9d/h?rlkey=anna5roa7netrmkjjm8p2hvyy&dl=1",
            f"{_DBX}/fo/254wkiknythx5vlenic3j/h?rlkey=zzneclei6tmagbxhqlewkj7l3&dl=1",
        ),
        "folder",
    ),
}

# What to fetch of a hub repo: configs, tokenizer and weights, preferring safetensors.
_HUB_META = ["*.json", "tokenizer.model", "*.txt"]
_HUB_SAFETENSORS = ["*.safetensors"]
_HUB_BIN = ["*.bin"]
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """`$LTU_AS_CACHE`, else `$XDG_CACHE_HOME/ltu_as`, else `~/.cache/ltu_as`."""
    if os.environ.get("LTU_AS_CACHE"):
        return Path(os.environ["LTU_AS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ltu_as"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def is_remote(source: str) -> bool:
    """Whether `source` names something fetched rather than a local path: `authors:NAME`, an http(s) URL or a hub
    id `org/name` (exactly one slash, no leading `.`, `/` or `~`)."""
    if source.startswith(("authors:", "http://", "https://")):
        return True
    if Path(source).suffix in (".bin", ".pt", ".safetensors"):  # a weights file, never a hub repo's name
        return False
    return not source.startswith((".", "/", "~")) and source.count("/") == 1


def recordable(source: str | Path) -> str:
    """How a checkpoint records a component's source: an existing local path as an absolute path (so the
    checkpoint loads from any working directory), anything else (hub id, URL, `authors:` name) as given."""
    path = Path(str(source)).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def anchored(source: str, checkpoint: Path) -> str:
    """A source recorded in the checkpoint folder `checkpoint`, as found from here.

    An absolute path stays as it is. A relative path (older checkpoints recorded paths as typed on the command
    line) is taken relative to the checkpoint folder when it exists there, else relative to the working
    directory when it exists there; a path found in neither place is returned relative to the checkpoint, so the
    error names where it was looked for. Hub ids, URLs and `authors:` names are returned as they are, unless a
    folder of that name lies beside the checkpoint or in the working directory."""
    path = Path(source).expanduser()
    if path.is_absolute():
        return str(path)
    beside = checkpoint / path
    if beside.exists():
        return str(beside.resolve())
    if path.exists():
        return str(path.resolve())
    return source if is_remote(source) else str(beside)


def resolve(source: str | Path, what: str, *, cache: Path | None = None, progress: bool = True) -> Path:
    """Return a local path for `source`, downloading it once if needed.

    Parameters
    ----------
    source: a local file or folder; `authors:NAME` (see `AUTHORS_RELEASES`); an http(s) URL (append
        `#sha256=HEX` to verify); or a hub id `org/name` (optionally `org/name@revision`).
    what: what the component is, for error messages ("Whisper encoder", "LLM", "LTU-AS checkpoint").
    """
    source = str(source)
    path = Path(source).expanduser()
    if path.exists():
        return path
    cache = cache or cache_dir()
    if source.startswith("authors:"):
        name = source.split(":", 1)[1]
        if name not in AUTHORS_RELEASES:
            raise ModelNotFoundError(
                f"unknown authors' release {name!r} for the {what}; known: {sorted(AUTHORS_RELEASES)}"
            )
        return fetch_release(name, AUTHORS_RELEASES[name], cache / "authors", what, progress)
    if source.startswith(("http://", "https://")):
        url, _, frag = source.partition("#sha256=")
        target = cache / "urls" / hashlib.sha256(url.encode()).hexdigest()[:16] / _url_filename(url)
        return download_url(url, target, what, sha256=frag or None, progress=progress)
    if not is_remote(source):
        raise ModelNotFoundError(
            f"the {what} path {source} does not exist; give an existing path, a hub id like org/name, "
            "an http(s) URL or an authors: release name"
        )
    return hub_snapshot(source, what, progress=progress)


def hub_snapshot(repo: str, what: str, *, progress: bool = True) -> Path:
    """Download (or find in the hub cache) a hub repo's configs, tokenizer and weights."""
    repo_id, _, revision = repo.partition("@")
    tqdm_class = None if progress else _SilentTqdm

    def snapshot(patterns: list[str]) -> Path:
        return Path(
            str(
                snapshot_download(
                    repo_id=repo_id,
                    revision=revision or None,
                    local_files_only=_offline(),
                    tqdm_class=tqdm_class,
                    allow_patterns=patterns,
                )
            )
        )

    try:
        folder = snapshot(_HUB_META + _HUB_SAFETENSORS)
        if not any(folder.glob("*.safetensors")):
            folder = snapshot(_HUB_META + _HUB_BIN)
    except LocalEntryNotFoundError as e:
        raise ModelNotFoundError(
            f"the {what} {repo} is not in the Hugging Face cache and downloads are off or impossible "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). Download it once online "
            f"(`huggingface-cli download {repo_id}`) or pass a local folder instead."
        ) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot download the {what} {repo} from the Hugging Face hub: {e}") from e
    return folder


class _SilentTqdm(tqdm):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _url_filename(url: str) -> str:
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return name or "download"


def download_url(
    url: str, target: Path, what: str, *, sha256: str | None = None, progress: bool = True, timeout: float = 60.0
) -> Path:
    """Download `url` to `target` once: resumes a partial `.part` file with an HTTP Range request, shows a
    progress bar, checks the size against Content-Length and the sha256 when given, then renames into place."""
    if target.is_file():
        return target
    if _offline():
        raise ModelNotFoundError(
            f"the {what} is not downloaded yet ({target}) and downloads are off (HF_HUB_OFFLINE=1); "
            f"fetch {url} once online, or pass a local path instead"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = getattr(response, "status", 200)
            if have and status != 206:  # the server ignored the Range header: start over
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with (
                open(part, "ab" if have else "wb") as out,
                tqdm(
                    total=total,
                    initial=have,
                    unit="B",
                    unit_scale=True,
                    desc=f"{what}: {target.name}",
                    disable=not progress,
                ) as bar,
            ):
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range not satisfiable: the part file is already complete
            total = have
        else:
            raise ModelNotFoundError(f"cannot download the {what} from {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise ModelNotFoundError(
            f"cannot download the {what} from {url}: {e}. The partial file {part} is kept; run again to resume."
        ) from e
    size = part.stat().st_size
    if total is not None and size != total:
        raise ModelNotFoundError(
            f"download of the {what} stopped at {size} of {total} bytes ({part}); run again to resume"
        )
    if sha256 is not None:
        digest = _sha256(part)
        if digest != sha256.lower():
            part.unlink()
            raise ModelNotFoundError(f"the {what} from {url} has sha256 {digest}, expected {sha256}; deleted, retry")
    part.replace(target)
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch_release(name: str, release: Release, root: Path, what: str, progress: bool = True) -> Path:
    """Fetch one of the authors' files, or assemble one of their folders from its zip archives."""
    if release.kind == "file":
        return download_url(release.urls[0], root / name, what, sha256=release.sha256, progress=progress)
    folder = root / name
    done = folder / ".complete"
    if done.exists():
        return _model_root(folder)
    for i, url in enumerate(release.urls):
        archive = download_url(url, root / f"{name}.part{i}.zip", what, progress=progress)
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(folder)  # later archives overwrite earlier ones (config folder over weights)
        except zipfile.BadZipFile as e:
            archive.unlink()
            raise ModelNotFoundError(f"the {what} archive from {url} is not a zip file; deleted it, run again") from e
    root_folder = _model_root(folder)
    done.write_text("ok\n")
    for i in range(len(release.urls)):
        (root / f"{name}.part{i}.zip").unlink(missing_ok=True)
    return root_folder


def _model_root(folder: Path) -> Path:
    """The folder holding `config.json`, wherever the archives nested it."""
    configs = sorted(folder.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise ModelNotFoundError(f"{folder} holds no config.json after extraction; delete it and run again")
    root = configs[0].parent
    # The authors' config folder links to the weight shards of their `vicuna` folder: gather them next to it.
    for shard in folder.rglob("pytorch_model-*.bin"):
        dest = root / shard.name
        if shard.parent != root and not dest.exists():
            shutil.move(str(shard), dest)
    return root
