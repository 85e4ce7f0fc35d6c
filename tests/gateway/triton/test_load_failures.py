"""A version Triton fails to load is published (issue 25, item 3's alert): in poll mode a bad
version leaves the old one ready and serving, so readiness and the configs say nothing; the
gateway reads Triton's repository index and sets ``inception_gateway_model_load_failed``,
which the alert ModelLoadFailing watches. Against a real tritonserver in poll mode whose
repository API is restricted, as compose and Kubernetes run it: read with the admin key
from ``GATEWAY_TRITON_ADMIN_KEY_FILE``."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from embedded.tritonserver import TritonServer
from service.settings import Settings
from service.triton import TritonBackend

from ..helpers import MODEL, classify, copied_repository, photo, running_gateway

pytestmark = pytest.mark.integration

KEY = "test-admin-key"


def load_failed(text: str) -> float | None:
    prefix = f'inception_gateway_model_load_failed{{model="{MODEL}"}} '
    line = next((x for x in text.splitlines() if x.startswith(prefix)), None)
    return None if line is None else float(line.rsplit(" ", 1)[1])


def test_a_version_that_fails_to_load_is_published_while_the_old_one_serves(tmp_path: Path) -> None:
    repository = copied_repository(tmp_path)
    served = (repository / MODEL / "1" / "model.pt").resolve().read_bytes()
    key_file = tmp_path / "admin-key"
    key_file.write_text(KEY + "\n")
    triton_args = [
        "--model-control-mode=poll",
        "--repository-poll-secs=1",
        f"--grpc-restricted-protocol=model-repository:admin-key={KEY}",
    ]
    env = {
        "GATEWAY_MODELS": MODEL,
        "GATEWAY_DEFAULT_MODEL": MODEL,
        "GATEWAY_CONFIG_MAX_AGE_S": "1",
        "GATEWAY_TRITON_ADMIN_KEY_FILE": str(key_file),
    }
    image = photo("chelsea.png").read_bytes()
    with (
        TritonServer(repository, log_path=tmp_path / "triton.log", extra_args=triton_args) as triton,
        running_gateway(triton.grpc_url, tmp_path / "gateway.log", env=env) as gateway,
        gateway.client() as client,
    ):
        assert load_failed(client.get("/metrics").text) == 0
        broken = repository / MODEL / "2"
        broken.mkdir()
        (broken / "model.pt").write_bytes(served[: len(served) // 3])  # a truncated export
        deadline = time.monotonic() + 60
        while load_failed(client.get("/metrics").text) != 1:
            assert time.monotonic() < deadline, "the failed load was never published"
            answer = classify(client, image, "image/png", model=MODEL, top_k=1)
            assert answer.status_code == 200, answer.text  # the old version serves throughout
            time.sleep(0.5)
        assert "failed to load" in (tmp_path / "gateway.log").read_text()

        # The fix is a good export after it (version 3): the failed version is superseded.
        fixed = repository / MODEL / "3"
        fixed.mkdir()
        (fixed / "model.pt").symlink_to((repository / MODEL / "1" / "model.pt").resolve())
        deadline = time.monotonic() + 90
        while load_failed(client.get("/metrics").text) != 0:
            assert time.monotonic() < deadline, "the failure outlived the version that fixed it"
            assert classify(client, image, "image/png", model=MODEL, top_k=1).status_code == 200
            time.sleep(0.5)


def test_without_the_key_a_restricted_index_is_not_read_and_nothing_is_claimed(tmp_path: Path) -> None:
    repository = copied_repository(tmp_path)
    triton_args = [f"--grpc-restricted-protocol=model-repository:admin-key={KEY}"]
    env = {"GATEWAY_MODELS": MODEL, "GATEWAY_DEFAULT_MODEL": MODEL}
    with (
        TritonServer(repository, log_path=tmp_path / "triton.log", extra_args=triton_args) as triton,
        running_gateway(triton.grpc_url, tmp_path / "gateway.log", env=env) as gateway,
        gateway.client() as client,
    ):
        assert load_failed(client.get("/metrics").text) is None
        assert "repository index not read" in (tmp_path / "gateway.log").read_text()


class _IndexOnly:
    """Triton's repository index as 2.51 words it, for the rule alone (a unit test)."""

    def __init__(self, models: list[dict[str, str]]) -> None:
        self.models = models

    async def get_model_repository_index(self, **_: object) -> dict[str, object]:
        return {"models": self.models}


@pytest.mark.parametrize(
    ("entries", "failed"),
    [
        (
            [
                {"version": "1", "state": "READY"},
                {"version": "2", "state": "UNAVAILABLE", "reason": "Internal: x"},
            ],
            True,
        ),
        (
            [
                {"version": "1", "state": "UNAVAILABLE", "reason": "unloaded"},
                {"version": "2", "state": "READY"},
            ],
            False,
        ),
        (
            [
                {"version": "2", "state": "UNAVAILABLE", "reason": "Internal: x"},
                {"version": "3", "state": "READY"},
            ],
            False,
        ),
        (
            [
                {"version": "1", "state": "READY"},
                {"version": "2", "state": "UNAVAILABLE", "reason": "Unavailable: unable to find '/m/2'"},
            ],
            False,
        ),
        ([{"version": "1", "state": "UNAVAILABLE", "reason": "Internal: x"}], True),
    ],
    ids=["newer-failed", "older-unloaded", "superseded", "gone-from-disk", "nothing-ready"],
)
def test_which_index_entries_are_load_failures(entries: list[dict[str, str]], failed: bool) -> None:
    backend = TritonBackend(Settings(models=[MODEL], default_model=MODEL))
    backend._client = _IndexOnly([{"name": MODEL, **e} for e in entries])  # type: ignore[assignment]
    assert asyncio.run(backend.check_loads()) == ({MODEL: "Internal: x"} if failed else {})
