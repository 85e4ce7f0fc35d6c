"""Answers cached by content (issue 21, item 2): the cache itself (bounded in bytes,
charged to the worker's memory account and giving way to requests), its key, and end to
end against a real Triton whose config names the weights' sha256."""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from embedded.tritonserver import TritonServer
from inception.contract import CPU_VARIANT
from inception.repository import parse, render
from service.cache import ENTRY_OVERHEAD, AnswerCache, cache_key
from service.errors import Overloaded
from service.memory import MemoryAccount

from ..helpers import MODEL, classify, copied_repository, photo, running_gateway

ENTRY = 1000 * 4 + ENTRY_OVERHEAD


def _probabilities(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(1000)


def test_the_cache_is_bounded_in_bytes_least_recently_used_first() -> None:
    memory = MemoryAccount(1 << 30)
    cache = AnswerCache(3 * ENTRY, memory)
    for i in range(3):
        assert cache.put(bytes([i]), _probabilities(i))
    assert cache.get(b"\x00") is not None  # 0 is now the most recently used
    assert cache.put(b"\x03", _probabilities(3))
    assert len(cache) == 3 and cache.get(b"\x01") is None and cache.get(b"\x00") is not None
    assert cache.bytes == memory.reserved == 3 * ENTRY
    hit = cache.get(b"\x03")
    assert hit is not None and hit.dtype == np.float32 and not hit.flags.writeable
    assert np.allclose(hit, _probabilities(3), atol=1e-7)
    cache.clear()
    assert cache.bytes == memory.reserved == 0


def test_the_cache_gives_its_memory_back_to_requests() -> None:
    """Requests come first: a reservation that does not fit takes the cache's entries, and
    the cache never displaces a request's memory (it stores nothing rather than wait)."""
    memory = MemoryAccount(10 * ENTRY)
    cache = AnswerCache(10 * ENTRY, memory)
    for i in range(10):
        cache.put(bytes([i]), _probabilities(i))
    assert memory.reserved == 10 * ENTRY
    memory.reserve_now(7 * ENTRY)  # a request: seven entries go
    assert len(cache) == 3 and memory.reserved == 10 * ENTRY and cache.bytes == 3 * ENTRY
    cache.clear()
    memory.reserve_now(3 * ENTRY)  # the account is full of requests
    assert not cache.put(b"x", _probabilities(0)) and len(cache) == 0
    with pytest.raises(Overloaded):
        memory.reserve_now(1)


def test_the_key_changes_with_everything_that_changes_the_answer() -> None:
    base = (b"image", ["inception_v4", ["inception_v4"], [1.0], []], 1, ["inception_v4:" + "a" * 64])
    key = cache_key(*base)
    assert key == cache_key(*base)
    variants = [
        (b"image2", *base[1:]),
        (base[0], ["ensemble(a,b)", ["a", "b"], [0.5, 0.5], []], *base[2:]),
        (base[0], ["ensemble(a,b)", ["a", "b"], [0.25, 0.75], []], *base[2:]),
        (base[0], base[1], 10, base[3]),
        (*base[:3], ["inception_v4:" + "b" * 64]),
    ]
    assert len({key, *(cache_key(*v) for v in variants)}) == len(variants) + 1


def _with_sha256(repository: Path, sha256: str) -> None:
    variant = repository / MODEL / "configs" / f"{CPU_VARIANT}.pbtxt"
    config = parse(variant.read_text())
    config.parameters["weights_sha256"].string_value = sha256
    variant.write_text(render(config))


def _counter(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    return sum(
        float(v) for v in re.findall(rf"^{name}_total\{{[^}}]*model=\"{MODEL}\"[^}}]*\}} (\S+)$", text, re.M)
    )


@pytest.mark.integration
def test_repeats_are_answered_from_the_cache_until_the_weights_change(tmp_path: Path) -> None:
    repository = copied_repository(tmp_path)
    _with_sha256(repository, "a" * 64)
    key = "k" * 24
    env = {
        "GATEWAY_MODELS": MODEL,
        "GATEWAY_DEFAULT_MODEL": MODEL,
        "GATEWAY_CONFIG_MAX_AGE_S": "1",
        "GATEWAY_API_KEYS": key,
    }
    poll = ["--model-control-mode=poll", "--repository-poll-secs=1"]
    auth = {"X-API-Key": key}
    chelsea = photo("chelsea.png").read_bytes()
    with (
        TritonServer(repository, log_path=tmp_path / "triton.log", extra_args=poll) as triton,
        running_gateway(triton.grpc_url, tmp_path / "gateway.log", env=env) as gateway,
        gateway.client(headers=auth) as client,
    ):
        miss = classify(client, chelsea, "image/png", top_k=10)
        assert (
            miss.status_code == 200 and miss.headers["X-Cache"] == "miss" and miss.json()["cached"] is False
        )
        hit = classify(client, chelsea, "image/png", top_k=3)
        assert hit.status_code == 200, hit.text
        assert hit.headers["X-Cache"] == "hit" and hit.json()["cached"] is True
        assert hit.json()["predictions"] == miss.json()["predictions"][:3]  # top_k cut from the cached answer
        assert "decode" not in hit.json()["timing_ms"] and "triton" not in hit.json()["timing_ms"]
        # A hit still goes through auth and options validation.
        anonymous = httpx.post(
            f"{gateway.url}/v1/classify", content=chelsea, headers={"Content-Type": "image/png"}, timeout=30
        )
        assert anonymous.status_code == 401
        assert classify(client, chelsea, "image/png", top_k=0).status_code == 422
        # Asked not to: neither read nor written.
        no_store = client.post(
            "/v1/classify",
            content=chelsea,
            headers={"Content-Type": "image/png", "Cache-Control": "no-store"},
        )
        assert no_store.headers["X-Cache"] == "bypass" and no_store.json()["cached"] is False
        # Asked to revalidate: computed again (a miss), and stored.
        no_cache = client.post(
            "/v1/classify",
            content=chelsea,
            headers={"Content-Type": "image/png", "Cache-Control": "no-cache"},
        )
        assert no_cache.headers["X-Cache"] == "miss" and no_cache.json()["cached"] is False
        assert no_cache.json()["predictions"][:3] == hit.json()["predictions"]
        # A batch with the repeat and a new image: one from the cache, one computed.
        coffee = photo("coffee.png").read_bytes()
        images = [base64.b64encode(d).decode() for d in (chelsea, coffee)]
        batch = client.post("/v1/classify", json={"images": images})
        assert batch.headers["X-Cache"] == "partial"
        assert [r["cached"] for r in batch.json()["results"]] == [True, False]
        assert _counter(client, "inception_gateway_cache_hits") == 2
        assert _counter(client, "inception_gateway_cache_misses") == 3
        # New weights (their sha256 in the config Triton loads): never an old answer.
        _with_sha256(repository, "b" * 64)
        deadline = time.monotonic() + 60
        while (answer := classify(client, chelsea, "image/png")).headers["X-Cache"] == "hit":
            assert time.monotonic() < deadline, "the cache still answers for the old weights"
            time.sleep(0.5)
        assert answer.status_code == 200 and answer.json()["cached"] is False
        listed = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        assert listed[MODEL]["weights_sha256"] == "b" * 64


@pytest.mark.integration
def test_the_cache_can_be_turned_off(tmp_path: Path) -> None:
    """Off by its setting, every answer is computed; on, against the same Triton, the
    repeat is a hit (so it was the setting)."""
    repository = copied_repository(tmp_path)
    _with_sha256(repository, "c" * 64)
    chelsea = photo("chelsea.png").read_bytes()
    with TritonServer(repository, log_path=tmp_path / "triton.log") as triton:
        for enabled, expected in (("false", ["bypass", "bypass"]), ("true", ["miss", "hit"])):
            env = {"GATEWAY_CACHE": enabled, "GATEWAY_MODELS": MODEL, "GATEWAY_DEFAULT_MODEL": MODEL}
            with (
                running_gateway(triton.grpc_url, tmp_path / f"gateway-{enabled}.log", env=env) as gateway,
                gateway.client() as client,
            ):
                answers = [classify(client, chelsea, "image/png") for _ in range(2)]
                assert [a.headers["X-Cache"] for a in answers] == expected
                assert [a.json()["cached"] for a in answers] == [x == "hit" for x in expected]


@pytest.mark.integration
def test_weights_without_a_sha256_are_never_cached(client: httpx.Client) -> None:
    """The exported random initialisation names no sha256: no identity to key on."""
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert not models[MODEL]["weights_sha256"]
    chelsea = photo("chelsea.png").read_bytes()
    answers = [classify(client, chelsea, "image/png", model=MODEL) for _ in range(2)]
    assert [a.headers["X-Cache"] for a in answers] == ["bypass", "bypass"]
