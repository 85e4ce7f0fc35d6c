"""A run of `python -m bench.gpu.stack` as its stages see it: `Run` (the plan, the deadline,
the results, written out after every stage) and `Stack` (what one stage hands the next).

Below the stages, which all take both: the stages import this, never the command that
orders them (`stack.py`), so they import one another only downwards.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.gpu.install import Environment, Server
from bench.gpu.plan import Plan
from bench.gpu.report import markdown

_STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[gpu-stack +{time.monotonic() - _STARTED:5.1f}s] {message}", flush=True)


class Run:
    """The run's results, its deadline and its stages; written out after each stage."""

    def __init__(self, out: Path, plan: Plan) -> None:
        self.out = out
        self.plan = plan
        self.started = time.monotonic()
        self.results: dict[str, Any] = {
            "command": " ".join(["python -m bench.gpu.stack", *sys.argv[1:]]),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "plan": asdict(plan),
            "stages": {},
        }
        self.stage_end = 0.0

    def remaining(self) -> float:
        """Seconds left in the current stage (and in the run)."""
        return max(0.0, min(self.stage_end, self.started + self.plan.deadline) - time.monotonic())

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Runs a stage within its budget; records ok / failed / skipped and its time. The
        body starts with `need()`, which skips it when the run is out of time or a stage it
        needs did not succeed."""
        budget = self.plan.budgets.get(name, 30.0)
        left = max(0.0, self.started + self.plan.deadline - time.monotonic())
        record: dict[str, Any] = {"budget_s": budget}
        self.results["stages"][name] = record
        self.stage_end = time.monotonic() + min(budget, left)
        began = time.monotonic()
        log(f"stage {name} (budget {min(budget, left):.0f} s)")
        try:
            yield record
            record["status"] = "ok"
        except StageSkipped as skipped:
            record["status"] = f"skipped: {skipped}"
        except Exception as exc:
            record["status"] = "failed"
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc()[-4000:]
            log(f"stage {name} failed: {record['error']}")
        finally:
            record["seconds"] = round(time.monotonic() - began, 1)
            self.write()

    def need(self, *names: str) -> None:
        """Skips the current stage if the run is out of time or a named stage did not
        succeed."""
        if self.remaining() <= 1:
            raise StageSkipped("out of time")
        failed = [n for n in names if self.results["stages"].get(n, {}).get("status") != "ok"]
        if failed:
            raise StageSkipped(f"needs {', '.join(failed)}")

    def write(self) -> None:
        self.results["total_seconds"] = round(time.monotonic() - self.started, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_stack.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        (self.out / "gpu_stack.md").write_text(markdown(self.results) + "\n")


class StageSkipped(Exception):
    """A stage that did not run: the deadline passed, or a stage it needs failed."""


@dataclass
class Stack:
    """What the stages hand each other."""

    work: Path
    env: Environment = field(default_factory=Environment)
    server: Server | None = None
    backend_directory: Path | None = None
    photos: list[Path] = field(default_factory=list)
    repository: Path | None = None
    triton: Any = None  # a KitTritonServer while one runs
    tuning: Any = None  # a winner.Tuning: the variants, traced while Triton warms up
