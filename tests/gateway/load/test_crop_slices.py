"""Multi-crop requests in time slices (service/batches.py, ``Policy.crop_batch``): alone on
its model a request's crops go in full batches; while another client sends to the model,
in batches the model computes within a quarter of the latency objective, so that a photo
beside a 144-crop request waits one slice, not a batch of 8 (a second on two CPU cores)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np

from service.batches import infer_images
from service.gateway import Gateway
from service.imaging import Prepared
from service.model_config import parse_model_config
from service.settings import Settings

from ..helpers import UNREACHABLE, model_config_json

MODEL = "inception_resnet_v1"


def gateway_with(rate: float | None, others: int) -> Gateway:
    gateway = Gateway(Settings(triton_grpc_url=UNREACHABLE, crop_batch_size=8, latency_target_s=0.5))
    load = gateway.policy.admission.load(MODEL)
    load.rate = rate
    for n in range(others):
        load.enter(1, f"other-{n}")
    return gateway


def test_alone_a_request_keeps_full_batches() -> None:
    assert gateway_with(rate=8.0, others=0).policy.crop_batch([MODEL], "me") == 8


def test_beside_another_client_a_slow_model_gets_slices_of_one_crop() -> None:
    # 8 images a second (two CPU cores) computes one in an eighth of a second.
    assert gateway_with(rate=8.0, others=1).policy.crop_batch([MODEL], "me") == 1
    assert gateway_with(rate=40.0, others=1).policy.crop_batch([MODEL], "me") == 5


def test_a_fast_model_keeps_full_batches_beside_others() -> None:
    assert gateway_with(rate=2000.0, others=3).policy.crop_batch([MODEL], "me") == 8


def test_an_unmeasured_model_keeps_full_batches() -> None:
    assert gateway_with(rate=None, others=1).policy.crop_batch([MODEL], "me") == 8


def test_a_client_that_just_left_still_counts() -> None:
    """A client sending one photo at a time holds no place between its requests; the slice
    must already be in force when its next one arrives."""
    gateway = gateway_with(rate=8.0, others=1)
    gateway.policy.admission.load(MODEL).leave(1, 0.1, "other-0")
    assert gateway.policy.crop_batch([MODEL], "me") == 1


class Recorder:
    """A stand-in Triton that records the batch of each call (the function under test is
    the cutting of crops into calls)."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def infer(self, name: str, batch: dict[str, np.ndarray], request_id: str) -> np.ndarray:
        size = next(iter(batch.values())).shape[0]
        self.batches.append(size)
        return np.full((size, 1000), 1e-3, np.float32)


def batches_sent(crops: int, batch_size: int, max_batch_size: int = 64) -> list[int]:
    info = replace(parse_model_config(model_config_json()), max_batch_size=max_batch_size)
    prepared = Prepared(batches={info.preprocessing: np.zeros((crops, 8, 8, 3), np.uint8)}, size=(8, 8))
    backend = Recorder()
    asyncio.run(infer_images(backend, info, [prepared], "rid", batch_size))  # type: ignore[arg-type]
    return backend.batches


def test_a_fixed_batch_size_and_the_models_limit() -> None:
    assert batches_sent(1, 64) == [1]
    assert batches_sent(144, 64) == [64, 64, 16]
    assert batches_sent(144, 0) == [64, 64, 16]  # 0: the model's max_batch_size
    assert batches_sent(10, 0, max_batch_size=0) == [10]  # no limit at all: one call


def test_the_batch_size_is_asked_before_each_call() -> None:
    info = parse_model_config(model_config_json())
    crops = np.zeros((20, 299, 299, 3), np.uint8)
    prepared = Prepared(batches={info.preprocessing: crops}, size=(299, 299))
    sizes = iter([8, 1, 1, 8, 8])
    backend = Recorder()
    answers = asyncio.run(
        infer_images(backend, info, [prepared], "rid", lambda: next(sizes))  # type: ignore[arg-type]
    )
    assert backend.batches == [8, 1, 1, 8, 2]  # the last call takes what is left
    assert len(answers) == 1 and answers[0].shape == (1, 1000)
