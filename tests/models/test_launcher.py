"""`python -m embedded.tritonserver`: a readiness failure or a signal during the wait ends
it promptly, and never leaves a tritonserver behind."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inception.rollout import served_model_file

from ..helpers import ROOT

pytestmark = pytest.mark.integration

MODEL = "inception_resnet_v1"


def servers_of(repository: Path) -> list[int]:
    """tritonserver processes serving `repository` (from /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"tritonserver") and f"--model-repository={repository}".encode() in args:
            found.append(int(cmdline.parent.name))
    return found


def one_model(repository: Path, tmp_path: Path, model_file: bytes | None = None) -> Path:
    folder = tmp_path / "repository" / MODEL
    (folder / "configs").mkdir(parents=True)
    (folder / "1").mkdir()
    for name in ("config.pbtxt", "configs/cpu.pbtxt", "labels.txt"):
        shutil.copyfile(repository / MODEL / name, folder / name)
    target = folder / "1" / "model.pt"
    if model_file is None:
        target.symlink_to(served_model_file(repository, MODEL).resolve())
    else:
        target.write_bytes(model_file)
    return folder.parent.resolve()


def launch(repository: Path, tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "embedded.tritonserver", "--repository", str(repository),
         "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--log", str(tmp_path / "t.log"),
         *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_failed_readiness_exits_with_the_reason_and_no_orphan(repository: Path, tmp_path: Path) -> None:
    broken = one_model(repository, tmp_path, model_file=b"not TorchScript")
    process = launch(broken, tmp_path)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1, err
    assert "failed to load" in err and MODEL in err
    assert servers_of(broken) == []


def test_readiness_timeout_stops_the_running_server(repository: Path, tmp_path: Path) -> None:
    """A healthy server that is not ready in time (here: still loading) is stopped, not
    left running."""
    served = one_model(repository, tmp_path)
    process = launch(served, tmp_path, "--timeout", "0.2")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1, err
    assert "not ready after" in err
    time.sleep(0.5)
    assert servers_of(served) == []


def test_a_signal_during_the_wait_ends_it_at_once(repository: Path, tmp_path: Path) -> None:
    served = one_model(repository, tmp_path)
    process = launch(served, tmp_path)
    deadline = time.monotonic() + 30
    while not servers_of(served) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert servers_of(served), "tritonserver did not start"
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert process.returncode == 0
    time.sleep(0.5)
    assert servers_of(served) == []


def test_free_port_never_hands_out_a_port_twice() -> None:
    """Ports chosen before any is bound (a server's three, two replicas') must differ."""
    from embedded.processes import free_port

    ports = [free_port() for _ in range(2000)]  # past the birthday bound of ~28k ephemeral ports
    assert len(set(ports)) == len(ports)
