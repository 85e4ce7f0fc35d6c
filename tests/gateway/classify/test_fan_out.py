"""A per-request ensemble's fan-out (`infer_all`): one member's failure is the answer and
cancels the members still running. A stand-in backend, because the function under test is
the concurrency, not Triton."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from service.batches import infer_all
from service.errors import ModelUnavailable
from service.imaging import Prepared
from service.model_config import ModelInfo, parse_model_config
from service.settings import Settings

from ..helpers import model_config_json

SETTINGS = Settings()

INFO = parse_model_config(model_config_json())
PRE = INFO.preprocessing
PREPARED = Prepared(batches={PRE: np.zeros((1, 299, 299, 3), np.uint8)}, size=(299, 299))


def infos(*names: str) -> list[ModelInfo]:
    return [replace(INFO, name=n) for n in names]


class Backend:
    def __init__(self) -> None:
        self.cancelled: list[str] = []

    async def infer(self, name: str, batch: object, request_id: str) -> np.ndarray:
        if name == "broken":
            await asyncio.sleep(0.05)
            raise ModelUnavailable("the model is not available")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            self.cancelled.append(name)
            raise
        return np.zeros((1, 1000), np.float32)


def test_one_failing_member_cancels_the_others() -> None:
    backend = Backend()
    gateway = SimpleNamespace(backend=backend, settings=SETTINGS)
    started = time.monotonic()
    with pytest.raises(ModelUnavailable):
        asyncio.run(infer_all(gateway, infos("slow", "broken"), [PREPARED], "rid"))  # type: ignore[arg-type]
    assert time.monotonic() - started < 2
    assert backend.cancelled == ["slow"]


def test_all_members_answer_in_order() -> None:
    class Echo:
        async def infer(self, name: str, batch: object, request_id: str) -> np.ndarray:
            await asyncio.sleep(0.01 if name == "a" else 0)
            return np.full((1, 1000), 1.0 if name == "a" else 2.0, np.float32)

    outputs = asyncio.run(
        infer_all(SimpleNamespace(backend=Echo(), settings=SETTINGS), infos("a", "b"), [PREPARED], "r")
    )  # type: ignore[arg-type]
    assert [float(images[0][0, 0]) for images in outputs] == [1.0, 2.0]  # per model, per image
