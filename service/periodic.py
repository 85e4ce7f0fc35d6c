"""Work the gateway repeats in the background (reading Triton's configs, seeding service
rates): one task a job, started once, outliving any one failure (a Triton restarting must
not end it for the worker's life), and stopped once, waiting for it to end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable


class Periodic:
    """``step`` every ``period_s`` seconds in a task of its own, its failures logged with
    ``failure`` on ``log`` and survived."""

    def __init__(
        self,
        name: str,
        period_s: float,
        step: Callable[[], Awaitable[object]],
        log: logging.Logger,
        failure: str,
    ) -> None:
        self.name = name
        self.period_s = period_s
        self.step = step
        self.log = log
        self.failure = failure
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self.step()
            except Exception:  # the job must outlive any one failure
                self.log.exception(self.failure)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
