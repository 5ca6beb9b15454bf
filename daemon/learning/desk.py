"""The learning desk: what clients ask of the daemon's learning (`label`, `label.list`, `label.remove`, `learn`,
`learn.rollback`), and the daily run at `learn.at`.

It receives narrow collaborators: the labelled clips (`LabelSet`), a way to read a window's audio while the ring
holds it, a way to swap the model's trainable weights (the model worker does it between batches) and the bus's
`publish` for `learn.progress` / `learn.done`. One job runs at a time, in a thread that owns it; its progress is
published from the loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import LearnConfig
from ..delivery.events import (
    LabelClass,
    LabelClip,
    Labelled,
    LabelRemoved,
    Labels,
    LearnDone,
    LearnProgress,
    LearnRolledBack,
    LearnStarted,
)
from ..delivery.protocol import Label, LabelList, LabelRemove, Learn, LearnRollback, ProtocolError
from ..delivery.wire import ErrorCode
from .active import Active
from .job import FineTuneJob, JobFailed, JobPlan
from .labels import LabelError, LabelSet

log = logging.getLogger(__name__)

WindowAudio = Callable[[str], "np.ndarray | bool | None"]  # window id → audio; None: gone; False: unknown
Swap = Callable[[str], Awaitable[str | None]]  # checkpoint → None when in use, else why not


class LearnDesk:
    def __init__(
        self,
        config: LearnConfig,
        root: Path,
        base: str,
        models: tuple[str | None, str | None],
        window_audio: WindowAudio,
        swap: Swap,
        publish: Callable[[Any], object],
    ) -> None:
        """`base`: the checkpoint in use when nothing was learned yet (`learn.base`, else `model.checkpoint`);
        `models`: `model.whisper`, `model.llm` (None: the checkpoint's own)."""
        self.config, self.root, self.base, self.models = config, root, base, models
        self.labels = LabelSet(root, config.max_clips, int(config.max_mb * 2**20))
        self.active = Active.load(root)
        self.window_audio, self.swap, self.publish = window_audio, swap, publish
        self.job: FineTuneJob | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_signature: str | None = None

    @property
    def in_use(self) -> str:
        return self.active.checkpoint or self.base

    def health(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "job": self.job.plan.job if self.job else None,
            "active": self.active.checkpoint,
            "accuracy": self.active.accuracy,
        }

    # --- protocol ---

    async def label(self, msg: Label) -> Labelled:
        audio = self.window_audio(msg.window)
        if audio is False:
            raise ProtocolError(ErrorCode.UNKNOWN_WINDOW, f"no window {msg.window} on this daemon", msg.id)
        if audio is None or isinstance(audio, bool):
            raise ProtocolError(
                ErrorCode.WINDOW_EXPIRED,
                f"the audio of {msg.window} is no longer in memory (audio.ring_seconds): label newer windows",
                msg.id,
            )
        label = self.config.background if msg.negative else msg.label.strip()
        if not label:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "label is empty", msg.id)
        try:
            name, n = await asyncio.to_thread(self.labels.add, label, audio, msg.window)
        except LabelError as e:
            raise ProtocolError(ErrorCode(e.code), str(e), msg.id) from None
        log.info("labelled %s as %r (%d clips of it)", msg.window, label, n)
        return Labelled(re=msg.id, label=label, clip=name, clips=n)

    async def list(self, msg: LabelList) -> Labels:
        classes = await asyncio.to_thread(self.labels.classes)
        return Labels(
            re=msg.id,
            classes=[
                LabelClass(
                    label=c.label,
                    folder=c.folder,
                    clips=[LabelClip(name=k.name, window=k.window, bytes=k.bytes, added=k.added) for k in c.clips],
                )
                for c in classes
            ],
            clips=sum(len(c.clips) for c in classes),
            bytes=sum(k.bytes for c in classes for k in c.clips),
            max_clips=self.labels.max_clips,
            max_bytes=self.labels.max_bytes,
            min_clips=self.config.min_clips,
            job=self.job.plan.job if self.job else None,
            active=self.active.checkpoint,
        )

    async def remove(self, msg: LabelRemove) -> LabelRemoved:
        try:
            n = await asyncio.to_thread(self.labels.remove, msg.label, msg.clip)
        except LabelError as e:
            raise ProtocolError(ErrorCode(e.code), str(e), msg.id) from None
        return LabelRemoved(re=msg.id, label=msg.label, removed=n)

    async def learn(self, msg: Learn) -> LearnStarted:
        try:
            job = await self.start()
        except ProtocolError as e:
            raise ProtocolError(e.code, str(e), msg.id) from None
        return LearnStarted(re=msg.id, job=job)

    async def rollback(self, msg: LearnRollback) -> LearnRolledBack:
        if self.job is not None:
            raise ProtocolError(ErrorCode.LEARN_BUSY, f"{self.job.plan.job} is running: wait for learn.done", msg.id)
        if self.active.checkpoint is None:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"no learned checkpoint is in use: {self.base} is the original", msg.id
            )
        target = self.active.previous[0] if self.active.previous else self.base
        why = await self.swap(target)
        if why is not None:
            raise ProtocolError(ErrorCode.INTERNAL, f"cannot go back to {target}: {why}", msg.id)
        self.active.rolled_back()
        await asyncio.to_thread(self.active.save, self.root)
        log.info("learn.rollback: %s in use again", target)
        return LearnRolledBack(re=msg.id, checkpoint=target)

    # --- jobs ---

    async def start(self) -> str:
        """Start a job now; its name. Raises `ProtocolError` (no id) when one runs or the labels are too few."""
        if self.job is not None:
            raise ProtocolError(ErrorCode.LEARN_BUSY, f"{self.job.plan.job} is running: wait for learn.done")
        classes = await asyncio.to_thread(self.labels.classes)
        short = [f"{c.label!r} ({len(c.clips)})" for c in classes if len(c.clips) < self.config.min_clips]
        if len(classes) < 2 or short:
            raise ProtocolError(
                ErrorCode.TOO_FEW_CLIPS,
                f"a fine-tune needs at least 2 labels with {self.config.min_clips} clips each (learn.min_clips); "
                + (f"these have fewer: {', '.join(short)}" if short else f"there are {len(classes)} labels"),
            )
        name = "job-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        whisper, llm = self.models
        plan = JobPlan(
            self.root,
            name,
            init=self.in_use,
            current=self.in_use,
            whisper=whisper,
            llm=llm,
            device=self.config.device,
            dtype=self.config.dtype,
            held_out=self.config.held_out,
            train_set=tuple(self.config.train_set),
        )
        loop = asyncio.get_running_loop()

        def progress(phase: str, done: int, total: int, detail: str) -> None:
            event = LearnProgress(job=name, phase=phase, done=done, total=total, detail=detail)
            loop.call_soon_threadsafe(self.publish, event)

        self.job = FineTuneJob(plan, progress)
        self._last_signature = await asyncio.to_thread(self.labels.signature)
        self._task = asyncio.create_task(self._run(self.job), name=f"learn {name}")
        log.info("learning job %s started from %s", name, plan.init)
        return name

    async def _run(self, job: FineTuneJob) -> None:
        try:
            await self._finish(job)
        finally:
            self.job = None

    async def _finish(self, job: FineTuneJob) -> None:
        p = job.plan
        started = time.monotonic()
        try:
            result = await asyncio.to_thread(job.run)
        except JobFailed as e:
            self._done(p.job, "failed", None, None, None, str(e))
            return
        except Exception as e:  # a bug: reported, and the daemon goes on
            log.exception("learning job %s failed", p.job)
            self._done(p.job, "failed", None, None, None, f"internal error: {type(e).__name__}: {e}")
            return
        took = f"{time.monotonic() - started:.0f} s"
        if not result.better:
            await asyncio.to_thread(shutil.rmtree, p.folder, True)
            self._done(
                p.job, "refused", result.accuracy, result.previous_accuracy, None,
                f"held-out accuracy {result.accuracy:.2f} is worse than {result.previous_accuracy:.2f} of the "
                f"checkpoint in use: it stays ({took})",
            )  # fmt: skip
            return
        self.publish(LearnProgress(job=p.job, phase="swap", done=0, total=1, detail="loading the new checkpoint"))
        why = await self.swap(str(result.checkpoint))
        if why is not None:
            self._done(p.job, "failed", result.accuracy, result.previous_accuracy, str(result.checkpoint), why)
            return
        stale = self.active.swapped_in(result.checkpoint, result.accuracy, self.config.keep)
        await asyncio.to_thread(self.active.save, self.root)
        for folder in stale:
            await asyncio.to_thread(shutil.rmtree, folder, True)
        self.publish(LearnProgress(job=p.job, phase="swap", done=1, total=1, detail="in use"))
        self._done(
            p.job, "swapped", result.accuracy, result.previous_accuracy, str(result.checkpoint),
            f"held-out accuracy {result.accuracy:.2f} (in use before: {result.previous_accuracy:.2f}) on "
            f"{result.held_out} clips; trained on {result.examples} ({took})",
        )  # fmt: skip

    def _done(
        self, job: str, outcome: str, acc: float | None, prev: float | None, ckpt: str | None, reason: str
    ) -> None:
        log.log(
            logging.WARNING if outcome == "failed" else logging.INFO, "learning job %s %s: %s", job, outcome, reason
        )
        self.publish(
            LearnDone(
                job=job,
                outcome=outcome,
                accuracy=None if acc is None else round(acc, 4),
                previous_accuracy=None if prev is None else round(prev, 4),
                checkpoint=ckpt,
                reason=reason,
            )
        )

    async def run_daily(self, stop: asyncio.Event) -> None:
        """At `learn.at` (local time) each day, a job when the labels changed since the last one."""
        if not self.config.at:
            return
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=seconds_until(self.config.at, dt.datetime.now()))
                return
            except TimeoutError:
                pass
            if await asyncio.to_thread(self.labels.signature) == self._last_signature:
                log.info("learn.at: no label changed since the last job; nothing to learn")
                continue
            try:
                await self.start()
            except ProtocolError as e:
                log.info("learn.at: no job: %s", e)

    async def close(self) -> None:
        if self.job is not None:
            self.job.cancel()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def seconds_until(at: str, now: dt.datetime) -> float:
    """Seconds from `now` to the next `HH:MM` (today's if still ahead, else tomorrow's); at least 1."""
    target = now.replace(hour=int(at[:2]), minute=int(at[3:]), second=0, microsecond=0)
    if target <= now:
        target += dt.timedelta(days=1)
    return max(1.0, (target - now).total_seconds())
