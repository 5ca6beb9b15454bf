"""Model sources: local paths, the hub offline, URL downloads over real HTTP (resume, verify), authors' folders."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from ltu_as import ModelNotFoundError
from ltu_as.loading import sources


class _Handler(http.server.BaseHTTPRequestHandler):
    files: ClassVar[dict[str, bytes]] = {}
    cut_once: ClassVar[set[str]] = set()  # paths whose first response stops half way
    ranges: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        data = self.files.get(self.path.split("?")[0])
        if data is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        self.ranges.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.cut_once:
            self.cut_once.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # drop the connection mid-transfer
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # downloads allowed, but only from this loopback server
    _Handler.files, _Handler.cut_once, _Handler.ranges = {}, set(), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_local_path_is_returned_as_is(tmp_path: Path) -> None:
    assert sources.resolve(tmp_path, "LLM") == tmp_path


def test_missing_local_path_says_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        sources.resolve(tmp_path / "nope", "LLM")


def test_hub_id_offline_and_not_cached_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sources, "_offline", lambda: True)  # huggingface_hub read HF_HUB_OFFLINE at import
    with pytest.raises(ModelNotFoundError) as err:
        sources.resolve("openai/whisper-large", "Whisper encoder")
    msg = str(err.value)
    assert "openai/whisper-large" in msg and "HF_HUB_OFFLINE" in msg and "local folder" in msg


def test_url_download_resumes_after_a_cut_and_verifies(server: str, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    _Handler.files["/ckpt.bin"] = data
    _Handler.cut_once.add("/ckpt.bin")
    target = tmp_path / "ckpt.bin"
    with pytest.raises(ModelNotFoundError, match="run again to resume"):
        sources.download_url(f"{server}/ckpt.bin", target, "LTU-AS checkpoint", progress=False)
    part = target.with_name("ckpt.bin.part")
    assert 0 < part.stat().st_size < len(data)
    digest = hashlib.sha256(data).hexdigest()
    got = sources.download_url(f"{server}/ckpt.bin", target, "LTU-AS checkpoint", sha256=digest, progress=False)
    assert got.read_bytes() == data and not part.exists()
    assert _Handler.ranges[-1] == f"bytes={len(data) // 2}-"  # the second request resumed
    # Cached: no third request.
    sources.download_url(f"{server}/ckpt.bin", target, "LTU-AS checkpoint", progress=False)
    assert len(_Handler.ranges) == 2


def test_url_download_rejects_wrong_hash_and_404(server: str, tmp_path: Path) -> None:
    _Handler.files["/a.bin"] = b"abc"
    with pytest.raises(ModelNotFoundError, match="expected 00"):
        sources.download_url(f"{server}/a.bin", tmp_path / "a.bin", "x", sha256="00" * 32, progress=False)
    assert not (tmp_path / "a.bin").exists()
    with pytest.raises(ModelNotFoundError, match="HTTP 404"):
        sources.download_url(f"{server}/missing.bin", tmp_path / "m.bin", "x", progress=False)


def test_url_source_with_sha_fragment_uses_the_cache(server: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LTU_AS_CACHE", str(tmp_path / "cache"))
    _Handler.files["/w/model.bin"] = b"weights"
    url = f"{server}/w/model.bin?dl=1#sha256={hashlib.sha256(b'weights').hexdigest()}"
    path = sources.resolve(url, "LTU-AS checkpoint", progress=False)
    assert path.read_bytes() == b"weights" and path.name == "model.bin"
    assert str(path).startswith(str(tmp_path / "cache"))


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_authors_folder_is_assembled_from_its_archives(server: str, tmp_path: Path, monkeypatch) -> None:
    # The authors ship the Vicuna weights and the config/tokenizer folder as two archives.
    _Handler.files["/vicuna"] = _zip(
        {"pytorch_model-00001-of-00002.bin": b"1", "pytorch_model-00002-of-00002.bin": b"2"}
    )
    _Handler.files["/vicuna_ltuas"] = _zip({"vicuna_ltuas/config.json": b"{}", "vicuna_ltuas/tokenizer.model": b"t"})
    release = sources.Release((f"{server}/vicuna?dl=1", f"{server}/vicuna_ltuas?dl=1"), "folder")
    monkeypatch.setitem(sources.AUTHORS_RELEASES, "vicuna_test", release)
    folder = sources.resolve("authors:vicuna_test", "LLM", cache=tmp_path, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "tokenizer.model",
    ]
    n = len(_Handler.ranges)
    assert sources.resolve("authors:vicuna_test", "LLM", cache=tmp_path, progress=False) == folder
    assert len(_Handler.ranges) == n  # complete: nothing fetched again


def test_unknown_authors_release(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"ltuas_long_noqa_a6\.bin"):
        sources.resolve("authors:nope", "LTU-AS checkpoint", cache=tmp_path)
