"""Which weights an export serves, and when it refuses: the hub tried briefly (`--hub auto`,
`make serve`'s default), random weights only where allowed (`--allow-random`; the deployment
images allow none unless told), and a pretrained export never replaced by random weights
because a source failed. Checkpoints are files the tests make themselves; the hub is one
that does not answer, as on CI."""

from __future__ import annotations

import http.server
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from embedded.processes import free_port
from inception import create_model
from inception.export import main
from inception.weights import hub_mode, hub_reachable


@pytest.fixture
def closed_hub(monkeypatch: pytest.MonkeyPatch) -> str:
    """HF_ENDPOINT where nothing listens: what the exporter meets without network."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    return endpoint


class Endpoint(str):
    """A URL that remembers the paths its server was asked for."""

    def __new__(cls, url: str, paths: list[str]) -> Endpoint:
        endpoint = super().__new__(cls, url)
        endpoint.paths = paths
        return endpoint

    paths: list[str]


@pytest.fixture
def answering_server() -> Iterator[Endpoint]:
    """A local HTTP server that answers 404 to everything; `.paths` lists what was asked."""
    paths: list[str] = []

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            paths.append(self.path)
            self.send_error(404)

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Endpoint(f"http://127.0.0.1:{server.server_address[1]}", paths)
    finally:
        server.shutdown()
        server.server_close()


def test_hub_settings_are_spelt_three_ways() -> None:
    assert [hub_mode(v) for v in ("auto", "1", "true", "ALWAYS", "0", "no", "never")] == [
        "auto", "always", "always", "always", "never", "never", "never",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="auto, always"):
        hub_mode("maybe")


def test_the_hub_check_is_short_and_any_answer_counts(closed_hub: str, answering_server: str) -> None:
    start = time.monotonic()
    assert hub_reachable(closed_hub, timeout=2) is False
    assert time.monotonic() - start < 2.5
    assert hub_reachable(answering_server, timeout=2) is True  # a 404 is still the hub answering


def test_the_hub_check_keeps_its_deadline_when_the_hub_hangs() -> None:
    """A peer that accepts the connection and never answers: False at the deadline."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:
        start = time.monotonic()
        assert hub_reachable(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=1) is False
        assert time.monotonic() - start < 1.5


def test_random_weights_that_nobody_allowed_fail_before_any_work(
    tmp_path: Path, closed_hub: str, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = tmp_path / "repository"
    code = main(
        [
            "--repository", str(repository), "--models", "inception_v4,inception_resnet_v1",
            "--hub", "auto", "--allow-random", "inception_v4", "--no-ensemble",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    # inception_v4 is allowed; inception_resnet_v1 is not, and none of it is published.
    assert "no real weights for inception_resnet_v1 (inception_resnet_v1: no checkpoint" in err
    assert "--allow-random inception_resnet_v1" in err
    assert not list(repository.rglob("model.pt"))


def test_a_refusal_comes_before_any_download(
    tmp_path: Path,
    answering_server: Endpoint,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The hub answers, but inception_resnet_v1 can have no real weights: the export stops
    before it downloads inception_v4's checkpoint (minutes, in a deployment)."""
    monkeypatch.setenv("HF_ENDPOINT", answering_server)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code = main(
        [
            "--repository", str(tmp_path / "repository"), "--models", "inception_v4,inception_resnet_v1",
            "--hub", "auto", "--allow-random", "none", "--no-ensemble",
        ]
    )  # fmt: skip
    assert code == 2
    assert (
        "no real weights for inception_resnet_v1 (inception_resnet_v1: no checkpoint"
        in capsys.readouterr().err
    )
    assert answering_server.paths == ["/"], answering_server.paths  # the check, no download


def test_make_serve_falls_back_to_random_with_a_message(
    repository: Path, tmp_path: Path, closed_hub: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--hub auto` without a hub: random weights, and the log says why. (A copy of the
    exported inception_v4, so that the run normally finds its work done.)"""
    local = tmp_path / "repository"
    shutil.copytree(repository / "inception_v4", local / "inception_v4")
    code = main(["--repository", str(local), "--models", "inception_v4", "--no-ensemble", "--hub", "auto"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"the hub ({closed_hub}) did not answer within 3 s: inception_v4 have published weights" in out
    if "kept the existing export (pretrained:" not in out:  # a hub-fed `make serve` was here before
        assert (
            "inception_v4: up to date (random-init), skipped" in out
            or "inception_v4: building (random init)" in out  # the export's code changed since
        ), out
        assert (
            "WARNING: inception_v4 serves random weights (no checkpoint was given and the hub "
            f"({closed_hub}) did not answer): its answers carry no meaning" in out
        )


@pytest.mark.slow
def test_a_pretrained_export_is_never_replaced_by_random_weights(
    tmp_path: Path, closed_hub: str, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "inception_resnet_v1"
    # "Trained" weights: the random initialisation with another classifier bias.
    state = create_model(name).state_dict()
    state["head.fc.bias"] = torch.linspace(-1, 1, state["head.fc.bias"].numel())
    checkpoint = tmp_path / "irv1-trained.pth"
    torch.save(state, checkpoint)
    repository = tmp_path / "repository"
    base = ["--repository", str(repository), "--models", name, "--no-ensemble", "--check-batch", "2"]

    assert main([*base, "--checkpoint", f"{name}={checkpoint}", "--allow-random", "none"]) == 0
    config = (repository / name / "configs" / "gpu.pbtxt").read_text()
    assert "pretrained:irv1-trained.pth" in config
    model_file = repository / name / "1" / "model.pt"
    written = model_file.stat().st_mtime_ns
    capsys.readouterr()

    # The checkpoint is gone (an unmounted volume) and the hub does not answer: a deployment
    # keeps what it served, even though random weights are not allowed.
    assert main([*base, "--hub", "auto", "--allow-random", "none"]) == 0
    out = capsys.readouterr().out
    assert f"{name}: kept the existing export (pretrained:irv1-trained.pth)" in out
    assert model_file.stat().st_mtime_ns == written
    assert "pretrained:irv1-trained.pth" in (repository / name / "configs" / "gpu.pbtxt").read_text()
    assert "WARNING" not in out

    # A deployment never writes random weights over them, even when told to use no hub and
    # allowed random weights; a laptop run that asks for exactly that (`make test`) does,
    # which is checked without the cost of an export here: the refusal comes first.
    assert main([*base, "--hub", "never", "--allow-random", "all", "--never-replace-pretrained"]) == 0
    assert f"{name}: kept the existing export" in capsys.readouterr().out
    assert model_file.stat().st_mtime_ns == written
    assert main([*base, "--hub", "never", "--allow-random", "none"]) == 2
    assert f"no real weights for {name}" in capsys.readouterr().err
