"""`VllmEngine`: the decode engine's interface (`submit`, `step`, `cancel`, `abort`, ...) over a vLLM OpenAI server
(`llm.backend = "vllm"`), so the model worker drives it exactly like the local `DecodeEngine`.

Each row is one streamed `POST /v1/completions` whose prompt is the row's input embeddings, `[audio ‖ text]`
`[n, hidden]` fp32, sent as `prompt_embeds` (base64 of `torch.save`; the server runs with `--enable-prompt-embeds`).
The Whisper encoder, TLTR and projector stay in this process; only the token embedding table of the LLM is loaded
here. vLLM batches, schedules and caches (prefix caching covers the shared audio + template start).

Threads: at most `max_concurrency` requests are open at once, each in a pool thread that reads the server's
stream and puts (row, token) events on one queue; `step()` (the model worker's thread) takes what arrived, waiting
at most `poll_s` for the first. Cancel closes that request's connection, which makes vLLM abort it.

Differences from the local engine, by design of the wire format:
- the repetition penalty sees only the generated tokens (vLLM does not see the prompt's text ids, only their
  embeddings); greedy answers with `repetition_penalty = 1` are token for token those of the local engine (a test
  checks it);
- no preemption: questions are sent first, and at most `max_concurrency` rows are open.

Failures: an unreachable server, an HTTP error, a malformed stream or no token within `token_timeout_s` end that
row with an `Output(error=...)` (the worker answers `llm_unavailable`); the daemon stays up.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import logging
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import torch

from ltu_as.serving.engine import Output, Request, Row, checked_row

log = logging.getLogger(__name__)


class LlmUnavailable(RuntimeError):
    """The vLLM server could not be reached, refused a request, or stopped sending tokens."""


def encode_embeds(embeds: torch.Tensor) -> str:
    """`[n, hidden]` → what vLLM's `prompt_embeds` takes: base64 of `torch.save` of a contiguous fp32 CPU tensor."""
    buf = io.BytesIO()
    torch.save(embeds.detach().to("cpu", torch.float32).contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class VllmEngine:
    """See the module docstring.

    embed: text token ids → `[n, hidden]` embeddings (the LLM's own table, loaded locally).
    eos_token_id: ends a row (never emitted), as in the local engine.
    """

    def __init__(
        self,
        *,
        url: str,
        embed: Callable[[Sequence[int]], torch.Tensor],
        eos_token_id: int,
        hidden_size: int,
        vocab_size: int,
        max_positions: int,
        max_concurrency: int = 16,
        api_key: str | None = None,
        served_model: str | None = None,
        connect_timeout_s: float = 5.0,
        token_timeout_s: float = 60.0,
        poll_s: float = 0.02,
    ) -> None:
        self.url = url.rstrip("/")
        self.embed = embed
        self.eos = int(eos_token_id)
        self.hidden, self.vocab = hidden_size, vocab_size
        self.slots = max_concurrency
        self.max_positions = max_positions
        self.poll_s = poll_s
        self.served_model = served_model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(token_timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_concurrency + 2),
        )
        self.pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="vllm")
        self.events: queue.Queue[tuple[Row, int | None, str | None, Exception | None]] = queue.Queue()
        self.waiting: list[Row] = []  # submitted, not yet handed to a pool thread
        self.open: set[Row] = set()  # handed to a pool thread, not finished
        self.prefixes: dict[Any, Any] = {}  # vLLM keeps its own prefix cache; here for the worker's /healthz
        self._seq = itertools.count()
        self.counts = {"steps": 0, "requests": 0, "failed": 0, "preempted": 0, "prefix_hits": 0}

    # --- what the worker calls, as on DecodeEngine ---------------------------------------------------------------
    def submit(self, request: Request) -> Row:
        row = checked_row(
            request,
            next(self._seq),
            vocab=self.vocab,
            hidden=self.hidden,
            max_positions=self.max_positions,
            limit="the server's llm.max_positions",
        )
        self.waiting.append(row)
        return row

    def cancel(self, row: Row) -> None:
        row.cancelled = True

    def abort(self) -> list[Row]:
        rows = list(self.open) + self.waiting
        for r in rows:
            r.cancelled, r.state = True, "done"
        self.open.clear()
        self.waiting = []
        return rows

    @property
    def used(self) -> int:
        return len(self.open)

    @property
    def running(self) -> list[Row]:
        return [r for r in self.open if r.state == "running"]

    def has_work(self) -> bool:
        return bool(self.waiting or self.open)

    def step(self) -> list[Output]:
        """Send what waits (most urgent first) while fewer than `slots` are open, then deliver what arrived."""
        out: list[Output] = []
        for row in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(row)
            row.state = "done"
            out.append(Output(row, None, "cancelled"))
        self.waiting.sort(key=lambda r: (r.request.priority, r.seq))
        while self.waiting and len(self.open) < self.slots:
            row = self.waiting.pop(0)
            row.state = "prefill"
            self.open.add(row)
            self.counts["requests"] += 1
            self.pool.submit(self._stream, row, self._body(row))
        try:
            first = self.events.get(timeout=self.poll_s) if self.open else None
        except queue.Empty:
            first = None
        events = [first] if first is not None else []
        while True:
            try:
                events.append(self.events.get_nowait())
            except queue.Empty:
                break
        for row, token, finish, error in events:
            if row not in self.open:
                continue  # aborted meanwhile
            if error is not None:
                self.counts["failed"] += 1
                self._close(row)
                out.append(Output(row, None, "cancelled", error=error))
                continue
            if token is not None and not row.cancelled:
                if token == self.eos:
                    finish = "stop"
                else:
                    row.generated.append(token)
                    row.state = "running"
                    done = len(row.generated) >= row.max_new
                    out.append(Output(row, token, "length" if done else None))
                    if done:
                        self._close(row)
                        continue
            if row.cancelled:
                self._close(row)
                out.append(Output(row, None, "cancelled"))
            elif finish is not None:
                self._close(row)
                out.append(Output(row, None, "eos" if finish == "stop" else "length"))
        self.counts["steps"] += 1
        return out

    def run(self, requests: Sequence[Request]) -> list[list[int]]:
        rows = [self.submit(r) for r in requests]
        errors: list[Exception] = []
        while any(r.state != "done" for r in rows):
            errors += [o.error for o in self.step() if o.error is not None]
        if errors:
            raise errors[0]
        return [r.generated for r in rows]

    def close(self) -> None:
        self.abort()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()

    # --- the server ----------------------------------------------------------------------------------------------
    def model_name(self) -> str:
        """The served model's name: `llm.served_model`, else the first of `GET /models` (asked once)."""
        if self.served_model is None:
            try:
                r = self.http.get(f"{self.url}/models")
                r.raise_for_status()
                self.served_model = str(r.json()["data"][0]["id"])
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
                raise LlmUnavailable(f"the vLLM server at {self.url} did not list its model: {_why(e)}") from e
        return self.served_model

    def embeddings(self, request: Request) -> torch.Tensor:
        """`[n, hidden]` input embeddings of a request: its prefix, then its text tokens."""
        text = self.embed(request.ids).to(torch.float32)
        pe = request.prefix_embeds
        return text if pe is None else torch.cat([pe.to(text.device, torch.float32), text])

    def _body(self, row: Row) -> dict[str, Any]:
        o = row.request.options
        body: dict[str, Any] = {
            "prompt_embeds": encode_embeds(self.embeddings(row.request)),
            "max_tokens": row.max_new,
            "stream": True,
            "return_token_ids": True,
            "repetition_penalty": o.repetition_penalty,
            "skip_special_tokens": False,
        }
        if o.do_sample:
            body.update(temperature=o.temperature, top_p=o.top_p, top_k=o.top_k or -1)
            if o.seed is not None:
                body["seed"] = o.seed
        else:
            body["temperature"] = 0.0
        return body

    def _stream(self, row: Row, body: dict[str, Any]) -> None:
        """A pool thread: one streamed completion, its tokens put on the queue; closing the response (on cancel)
        aborts the request on the server."""
        try:
            body["model"] = self.model_name()
            with self.http.stream("POST", f"{self.url}/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise LlmUnavailable(f"the vLLM server answered {r.status_code}: {_error_text(r)}")
                for line in r.iter_lines():
                    if row.cancelled:
                        self.events.put((row, None, None, None))
                        return
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    choice = json.loads(data)["choices"][0]
                    ids = choice.get("token_ids") or []
                    finish = choice.get("finish_reason")
                    for i, token in enumerate(ids):
                        self.events.put((row, int(token), finish if i == len(ids) - 1 else None, None))
                    if not ids and finish is not None:
                        self.events.put((row, None, finish, None))
                else:
                    raise LlmUnavailable("the vLLM server closed the stream without [DONE]")
        except LlmUnavailable as e:
            self.events.put((row, None, None, e))
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
            self.events.put((row, None, None, LlmUnavailable(f"vLLM request failed: {_why(e)}")))
        except Exception as e:  # anything else still ends the row, never the pool thread silently
            log.exception("vLLM request failed")
            self.events.put((row, None, None, LlmUnavailable(f"vLLM request failed: {type(e).__name__}: {e}")))

    def _close(self, row: Row) -> None:
        row.state = "done"
        self.open.discard(row)

    def yes_no(
        self, requests: Sequence[Request], yes: Sequence[Sequence[int]], no: Sequence[Sequence[int]]
    ) -> list[float]:
        """P(yes) of each request from the log-probabilities of its first token's yes and no ids, exactly as the
        local engine computes it (`yes_probability`). Blocking; raises LlmUnavailable.

        vLLM returns *raw* log-probabilities (the model's, before any logits processor), and always the sampled
        token's own. So one request, with the yes and no ids as `allowed_token_ids`, gives the top 20 (enough for a
        trained model, whose yes and no lead); each id still missing then gets a request of its own with only that
        id allowed, which returns its log-probability (the random test model needs these).
        """
        out = []
        for req, y, n in zip(requests, yes, no, strict=True):
            embeds = encode_embeds(self.embeddings(req))
            wanted = list(dict.fromkeys([*y, *n]))
            logprobs = self._first_logprobs(embeds, wanted, 20)
            for tid in wanted:
                if tid not in logprobs:
                    logprobs.update(self._first_logprobs(embeds, [tid], 0))
            ly = torch.logsumexp(torch.tensor([logprobs[i] for i in y], dtype=torch.float64), 0)
            ln = torch.logsumexp(torch.tensor([logprobs[i] for i in n], dtype=torch.float64), 0)
            out.append(float(torch.sigmoid(ly - ln)))
        return out

    def _first_logprobs(self, embeds: str, allowed: list[int], top: int) -> dict[int, float]:
        """Raw log-probabilities of the first token after `embeds` (base64 prompt embeddings): the `top` highest
        and the sampled one, which is one of `allowed`."""
        body = {
            "model": self.model_name(),
            "prompt_embeds": embeds,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": top,
            "allowed_token_ids": allowed,
            "return_tokens_as_token_ids": True,
        }
        try:
            r = self.http.post(f"{self.url}/completions", json=body)
            if r.status_code != 200:
                raise LlmUnavailable(f"the vLLM server answered {r.status_code}: {_error_text(r)}")
            lp = r.json()["choices"][0]["logprobs"]
            got = {int(k.removeprefix("token_id:")): float(v) for k, v in lp["top_logprobs"][0].items()}
            got[int(lp["tokens"][0].removeprefix("token_id:"))] = float(lp["token_logprobs"][0])
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
            raise LlmUnavailable(f"vLLM request failed: {_why(e)}") from e
        return got


def _why(e: Exception) -> str:
    if isinstance(e, httpx.ConnectError):
        return "cannot connect (is the server running, and is llm.url right?)"
    if isinstance(e, httpx.TimeoutException):
        return "timed out (llm.connect_timeout_s / llm.token_timeout_s)"
    return f"{type(e).__name__}: {e}"


def _error_text(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return r.text[:300]
