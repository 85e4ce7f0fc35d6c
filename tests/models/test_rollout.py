"""Weights rolled out and back while Triton polls the repository (issue 25, item 3): each
change is a new version folder in a whole model folder swapped in at once, checked before
Triton may see it, one writer at a time; the models job waits until Triton serves what it
published; a rollback serves the previous version again. The integration tests run a real
tritonserver in poll mode (a 1 s poll) with a client sending inferences throughout, and
count every answer that is not a 200."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient

from embedded.tritonserver import TritonServer
from inception.contract import MODEL_FILE, PARAM_WEIGHTS, PARAM_WEIGHTS_SHA256
from inception.export import ensemble_entry, example_images, network_entry, quiet_torchscript
from inception.registry import get_spec
from inception.repository import Export, model_files, network_config, parse, repository_files
from inception.rollout import (
    ROLLED_BACK_FROM,
    STAMP,
    Expected,
    Rollout,
    RolloutError,
    describe_versions,
    file_sha256,
    is_served,
    read_stamp,
    served_model_file,
    served_version,
    store_of,
    triton_base,
    versions,
    wait_until_served,
    write_durably,
)

from ..helpers import ROOT
from .rollout_writer import MODEL, export_of, files_of, stage, traced

DEPLOY = ROOT / "deploy"


def quiet(message: str) -> None:
    pass


class Recorder:
    """A log that keeps what it was told."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, message: str) -> None:
        self.lines.append(message)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def publish_tiny(repository: Path, seed: int, log: Recorder | None = None) -> int:
    with Rollout(repository, log or quiet) as rollout:
        stage(rollout, seed)
        rollout.publish(MODEL, files_of(seed))
    number = served_version(repository / MODEL)
    assert number is not None
    return number


def stated(repository: Path, variant: str = "cpu") -> dict[str, str]:
    config = parse((repository / MODEL / "configs" / f"{variant}.pbtxt").read_text())
    return {k: v.string_value for k, v in config.parameters.items()}


# ------------------------------------------------------------------------ without Triton


def test_versions_are_the_folders_triton_reads_as_versions(tmp_path: Path) -> None:
    for name in ("1", "2", "10", "012", "0", "configs", "3x"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a folder")
    assert versions(tmp_path) == [0, 1, 2, 10]
    assert served_version(tmp_path) == 10
    assert versions(tmp_path / "missing") == [] and served_version(tmp_path / "missing") is None


def test_the_lock_and_staging_area_sit_beside_the_repository(tmp_path: Path) -> None:
    """Triton takes every folder of its repository root for a model, hidden ones too: a
    staging folder inside would fail to load (and stop a starting Triton)."""
    assert store_of(tmp_path / "repository") == tmp_path / ".repository.rollout"
    with Rollout(tmp_path / "repository", quiet):
        assert (tmp_path / ".repository.rollout" / "lock").is_file()
    assert not (tmp_path / "repository").exists() or not any((tmp_path / "repository").iterdir())


def test_a_repository_whose_lock_cannot_sit_beside_it_is_a_clear_error(tmp_path: Path) -> None:
    """The models image run with the volume itself as the repository: the lock and staging
    area cannot be made beside it (here its parent is a file), and the error says what to
    do instead of a traceback."""
    (tmp_path / "volume").write_text("not a folder")
    with pytest.raises(RolloutError, match="MODELS_REPOSITORY=/models/repository"):
        Rollout(tmp_path / "volume" / "repository", quiet).__enter__()


def test_each_export_is_a_new_version_and_the_one_before_is_kept(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    log = Recorder()
    assert [publish_tiny(repository, seed, log) for seed in (1, 2, 3)] == [1, 2, 3]
    folder = repository / MODEL
    assert versions(folder) == [2, 3]
    assert read_stamp(folder / "3")["weights_sha256"] == export_of(3).weights_sha256
    assert read_stamp(folder / "3")["model_sha256"] == file_sha256(folder / "3" / MODEL_FILE)
    for variant in ("cpu", "gpu"):
        assert stated(repository, variant)[PARAM_WEIGHTS_SHA256] == export_of(3).weights_sha256
    assert parse((folder / "config.pbtxt").read_text()).version_policy.latest.num_versions == 1
    assert "inception_resnet_v1: published version 3; version 2 kept for a rollback" in log.text
    assert list((store_of(repository) / "staging").iterdir()) == []


def test_a_publish_that_changes_nothing_touches_nothing(tmp_path: Path) -> None:
    """Triton's poller reloads a model whose folder has a newer file: an export with
    unchanged inputs must leave every file (and its time) as it was."""
    repository = tmp_path / "repository"
    publish_tiny(repository, 1)
    before = {p: p.stat().st_mtime_ns for p in (repository / MODEL).rglob("*")}
    with Rollout(repository, quiet) as rollout:
        assert rollout.publish(MODEL, files_of(1)) is False
    assert {p: p.stat().st_mtime_ns for p in (repository / MODEL).rglob("*")} == before


def test_a_truncated_file_and_configs_that_state_other_weights_are_refused(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    publish_tiny(repository, 1)
    before = sorted(p.relative_to(repository) for p in repository.rglob("*"))
    with (
        pytest.raises(RolloutError, match="is not the file its export wrote"),
        Rollout(repository, quiet) as rollout,
    ):
        model = stage(rollout, 2) / MODEL_FILE
        model.write_bytes(model.read_bytes()[:1000])
        rollout.publish(MODEL, files_of(2))
    mismatched = pytest.raises(RolloutError, match="a config and the weights it serves change together")
    with mismatched, Rollout(repository, quiet) as rollout:
        stage(rollout, 3)
        rollout.publish(MODEL, files_of(4))  # the configs of another export
    assert sorted(p.relative_to(repository) for p in repository.rglob("*")) == before
    assert stated(repository)[PARAM_WEIGHTS_SHA256] == export_of(1).weights_sha256
    assert list((store_of(repository) / "staging").iterdir()) == []


def test_a_rollback_serves_the_previous_file_and_a_second_returns(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    for seed in (1, 2):
        publish_tiny(repository, seed)
    folder = repository / MODEL
    files = {n: file_sha256(folder / str(n) / MODEL_FILE) for n in (1, 2)}
    with Rollout(repository, quiet) as rollout:
        assert rollout.rollback(MODEL) == 3
    assert versions(folder) == [2, 3]
    assert file_sha256(folder / "3" / MODEL_FILE) == files[1] == read_stamp(folder / "3")["model_sha256"]
    assert stated(repository)[PARAM_WEIGHTS_SHA256] == export_of(1).weights_sha256
    assert read_stamp(folder / "3")[ROLLED_BACK_FROM]["version"] == 2
    assert "a rollback from version 2" in describe_versions(repository, MODEL)[0]
    with Rollout(repository, quiet) as rollout:
        assert rollout.rollback(MODEL) == 4  # the version rolled back from, again
    assert file_sha256(folder / "4" / MODEL_FILE) == files[2]
    assert stated(repository)[PARAM_WEIGHTS_SHA256] == export_of(2).weights_sha256


def test_nothing_to_roll_back_is_a_clear_error(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    publish_tiny(repository, 1)
    with pytest.raises(RolloutError, match="only version 1 is kept"), Rollout(repository, quiet) as rollout:
        rollout.rollback(MODEL)
    with pytest.raises(RolloutError, match="no such model"), Rollout(repository, quiet) as rollout:
        rollout.rollback("inception_v4")


def test_a_rollback_of_a_member_restates_the_ensemble(tmp_path: Path) -> None:
    """The ensemble's config states its members' provenance: it follows a member's rollback."""
    repository = tmp_path / "repository"
    for seed in (1, 2):
        with Rollout(repository, quiet) as rollout:
            stage(rollout, seed)
            entry = network_entry(get_spec(MODEL), export_of(seed))
            rollout.publish_all(repository_files([entry], ensemble_entry([entry])))

    def ensemble_weights() -> str:
        config = parse((repository / "inception_ensemble" / "configs" / "gpu.pbtxt").read_text())
        return config.parameters[PARAM_WEIGHTS].string_value

    assert ensemble_weights() == f"pretrained:{MODEL}=tiny-2.pth"
    assert versions(repository / "inception_ensemble") == [1]
    with Rollout(repository, quiet) as rollout:
        rollout.rollback(MODEL)
    assert ensemble_weights() == f"pretrained:{MODEL}=tiny-1.pth"


def test_an_export_of_the_inputs_rolled_back_keeps_the_rollback(tmp_path: Path) -> None:
    """The models job runs at every `docker compose up`: it must not undo a rollback by
    exporting again the very inputs that were rolled back."""
    from inception.export import WeightsChoice, export_network, network_fingerprint

    repository = tmp_path / "repository"
    for seed in (1, 2):
        publish_tiny(repository, seed)
    choice = WeightsChoice(None, "random-init:0", "a test")
    # Version 2 held these inputs; version 3, the rollback, serves version 1's file.
    stamp_path = repository / MODEL / "2" / STAMP
    stamp = json.loads(stamp_path.read_text())
    stamp["fingerprint"] = network_fingerprint(MODEL, choice, "fp32")
    stamp_path.write_text(json.dumps(stamp))
    with Rollout(repository, quiet) as rollout:
        rollout.rollback(MODEL)
    log = Recorder()
    with Rollout(repository, log) as rollout:
        entry = export_network(MODEL, rollout, choice, "fp32", log)
    assert "kept the rollback to pretrained:tiny-1.pth" in log.text
    assert entry.export == export_of(1)
    assert versions(repository / MODEL) == [2, 3]


def test_with_no_triton_to_wait_for_the_job_says_so_and_succeeds(tmp_path: Path) -> None:
    from embedded.processes import free_port

    log = Recorder()
    url = f"127.0.0.1:{free_port()}"
    assert wait_until_served(url, [Expected(MODEL, 1)], timeout=5, log=log) is False
    assert f"no Triton answers at {url}" in log.text and "nothing to wait for" in log.text


# ------------------------------------------------------------------------ the entry point


def fake_python(tmp_path: Path) -> Path:
    script = tmp_path / "python"
    script.write_text('#!/bin/sh\necho "ARGS: $*"\n')
    script.chmod(0o755)
    return script


def entrypoint(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        "PATH": os.environ["PATH"],
        "PYTHON": str(fake_python(tmp_path)),
        "MODELS_REPOSITORY": str(tmp_path / "volume" / "repository"),
        "MODELS_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        **env,
    }
    return subprocess.run(
        ["sh", str(DEPLOY / "models-entrypoint.sh"), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        cwd=ROOT,
    )


def test_the_models_job_waits_for_the_triton_it_is_told_of(tmp_path: Path) -> None:
    result = entrypoint(tmp_path, MODELS_TRITON_URL="http://triton:8000", MODELS_TRITON_WAIT_S="90")
    assert result.returncode == 0, result.stderr
    assert "--triton-url http://triton:8000 --triton-timeout 90" in result.stdout
    assert "--triton-url" not in entrypoint(tmp_path).stdout


def test_the_models_image_rolls_back_with_one_command(tmp_path: Path) -> None:
    repository = tmp_path / "volume" / "repository"
    result = entrypoint(tmp_path, "rollback", "inception_v4", MODELS_TRITON_URL="triton:8000")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"ARGS: -m inception.rollback --repository {repository} "
        "--triton-url triton:8000 --triton-timeout 600 inception_v4"
    )
    listed = entrypoint(tmp_path, "versions")
    assert listed.stdout.strip() == f"ARGS: -m inception.rollback --repository {repository} --list"
    assert entrypoint(tmp_path, "rollback").returncode == 2
    unknown = entrypoint(tmp_path, "deploy")
    assert unknown.returncode == 2 and "unknown command 'deploy'" in unknown.stdout


def test_a_volume_of_the_old_layout_is_taken_over_once(tmp_path: Path) -> None:
    """Model folders at the volume's root (before the repository moved into a folder of its
    own) are copied into the repository, so that their weights are kept."""
    volume = tmp_path / "volume"
    old = volume / "inception_v4" / "1"
    old.mkdir(parents=True)
    (volume / "inception_v4" / "config.pbtxt").write_text("name: 'inception_v4'\n")
    (old / MODEL_FILE).write_bytes(b"weights")
    result = entrypoint(tmp_path)
    assert result.returncode == 0, result.stderr
    adopted = volume / "repository" / "inception_v4" / "1" / MODEL_FILE
    assert adopted.read_bytes() == b"weights"
    assert "copying the model folders" in result.stdout
    assert "copying" not in entrypoint(tmp_path).stdout  # once


# ------------------------------------------------------------------------ with Triton polling


@dataclass
class Traffic:
    """Inferences sent back to back to one model while a test runs: each answer's status
    (200, or the error Triton's client raised), the version that answered and its top
    class."""

    url: str
    answers: list[tuple[int, str, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        client = httpclient.InferenceServerClient(self.url, connection_timeout=10, network_timeout=30)
        images = example_images(1, seed=3).numpy()
        while not self._stop.is_set():
            image = httpclient.InferInput("image__0", list(images.shape), "UINT8")
            image.set_data_from_numpy(images)
            try:
                result = client.infer(MODEL, [image])
            except Exception as exc:  # every kind of failure counts, whatever raised it
                self.errors.append(f"{type(exc).__name__}: {exc}")
            else:
                probabilities = result.as_numpy("probabilities__0")
                assert probabilities is not None
                self.answers.append(
                    (200, str(result.get_response()["model_version"]), int(np.argmax(probabilities)))
                )
            time.sleep(0.02)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def check(self) -> None:
        """Answers came throughout, and every one was a 200."""
        assert self.errors == [], self.errors[:5]
        assert len(self.answers) >= 20, len(self.answers)

    def top_of(self, version: int) -> set[int]:
        return {top for _, answered, top in self.answers if answered == str(version)}


@dataclass
class Polled:
    repository: Path
    triton: TritonServer
    log_path: Path

    @property
    def base(self) -> str:
        return triton_base(self.triton.http_url)

    def serves(self, version: int, seed: int | None = None) -> bool:
        params = {} if seed is None else {PARAM_WEIGHTS_SHA256: export_of(seed).weights_sha256}
        return is_served(self.base, Expected(MODEL, version, params))

    def loads(self) -> int:
        """How many times Triton began loading the model (its log's `loading:` lines)."""
        return self.log_path.read_text(errors="replace").count(f"loading: {MODEL}:")


@pytest.fixture(scope="module")
def polled(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Polled]:
    """A repository of Inception-ResNet-v1 alone, version 1 the file `make repository`
    exported, served by a tritonserver that polls it every second."""
    work = tmp_path_factory.mktemp("rollout")
    served = served_model_file(repository, MODEL)
    root = work / "repository"
    production = Export("random-init", "", "fp32")
    with Rollout(root, quiet) as rollout:
        folder = rollout.new_version(MODEL)
        shutil.copyfile(served, folder / MODEL_FILE)
        stamp = {"fingerprint": "production", "weights": production.provenance, "weights_sha256": ""}
        stamp |= {"precision": "fp32", "model_sha256": file_sha256(served)}
        write_durably(folder / STAMP, json.dumps(stamp).encode())
        files = partial(network_config, network_entry(get_spec(MODEL), production))
        rollout.publish(MODEL, model_files(files))
    log = work / "tritonserver.log"
    poll = ["--model-control-mode=poll", "--repository-poll-secs=1"]
    with TritonServer(root, log_path=log, extra_args=poll).running(timeout=300) as triton:
        yield Polled(root, triton, log)


def wait_for(condition, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.2)


def writer(repository: Path, seed: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.models.rollout_writer", str(repository), str(seed), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.integration
def test_a_truncated_or_interrupted_export_never_reaches_triton(polled: Polled) -> None:
    folder = polled.repository / MODEL
    served, kept, loads = served_version(folder), versions(folder), polled.loads()
    assert served is not None and polled.serves(served)
    with Traffic(polled.triton.http_url) as traffic:
        # A model file cut short in the staging area: refused before any swap.
        truncated = pytest.raises(RolloutError, match="is not the file its export wrote")
        with truncated, Rollout(polled.repository, quiet) as rollout:
            model = stage(rollout, 11) / MODEL_FILE
            model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
            rollout.publish(MODEL, files_of(11))
        # An exporter killed after staging its file, before publishing it.
        killed = writer(polled.repository, 12, "--hold", "120")
        assert killed.stdout is not None
        assert "staged" in next(line for line in killed.stdout if "staged" in line or "published" in line)
        killed.kill()
        killed.wait(timeout=30)
        assert any((store_of(polled.repository) / "staging").iterdir())
        time.sleep(3)  # three polls of Triton's, which find nothing new
        assert versions(folder) == kept and polled.serves(served)
        # The next writer clears what the killed one left, and publishes.
        log = Recorder()
        number = publish_tiny(polled.repository, 13, log)
        assert "an interrupted writer left staged" in log.text
        wait_for(lambda: polled.serves(number, 13))
    traffic.check()
    # Triton never began a load of the two bad exports: one load, the good one.
    assert polled.loads() == loads + 1
    assert {version for _, version, _ in traffic.answers} <= {str(served), str(number)}


@pytest.mark.integration
def test_two_exporters_at_once_take_turns(polled: Polled) -> None:
    folder = polled.repository / MODEL
    served = served_version(folder)
    assert served is not None
    with Traffic(polled.triton.http_url) as traffic:
        started = time.monotonic()
        writers = {seed: writer(polled.repository, seed, "--hold", "1.5") for seed in (21, 22)}
        outputs = {seed: process.communicate(timeout=120)[0] for seed, process in writers.items()}
        assert all(process.returncode == 0 for process in writers.values()), outputs
        waited = [seed for seed, out in outputs.items() if "waiting for the repository's other writer" in out]
        assert len(waited) == 1, outputs  # one held the lock, the other waited for it
        second, first = waited[0], ({21, 22} - set(waited)).pop()
        assert time.monotonic() - started >= 3.0  # each held it 1.5 s, one after the other
        # The second found the first's work: its version follows, the first's is kept.
        assert versions(folder) == [served + 1, served + 2]
        assert read_stamp(folder / str(served + 1))["weights_sha256"] == export_of(first).weights_sha256
        newest = read_stamp(folder / str(served + 2))
        assert newest["weights_sha256"] == export_of(second).weights_sha256
        assert newest["model_sha256"] == file_sha256(folder / str(served + 2) / MODEL_FILE)
        for variant in ("cpu", "gpu"):
            assert stated(polled.repository, variant)[PARAM_WEIGHTS_SHA256] == newest["weights_sha256"]
        expected = Expected(MODEL, served + 2, {PARAM_WEIGHTS_SHA256: newest["weights_sha256"]})
        assert wait_until_served(polled.triton.http_url, [expected], timeout=60, log=quiet) is True
        time.sleep(1)  # answers of the new version
    traffic.check()
    with torch.no_grad():
        top = int(traced(second)(example_images(1, seed=3)).argmax())
    assert traffic.top_of(served + 2) == {top}


@pytest.mark.integration
def test_one_command_rolls_back_and_triton_answers_throughout(polled: Polled) -> None:
    """`python -m inception.rollback` (what `make rollback` and the models image's `rollback`
    run) serves the previous file again, its provenance with it, and waits for Triton."""
    folder = polled.repository / MODEL
    if len(versions(folder)) < 2:
        publish_tiny(polled.repository, 41)
        wait_for(lambda: polled.serves(versions(folder)[-1]))
    previous, served = versions(folder)
    previous_sha = read_stamp(folder / str(previous))["weights_sha256"]
    with Traffic(polled.triton.http_url) as traffic:
        time.sleep(1)  # answers of the served version, to compare
        rollback = subprocess.run(
            [sys.executable, "-m", "inception.rollback", MODEL, "--repository", str(polled.repository),
             "--triton-url", polled.triton.http_url, "--triton-timeout", "60"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert rollback.returncode == 0, rollback.stdout + rollback.stderr
        assert f"rolled back to the file of version {previous}" in rollback.stdout
        assert "Triton serves what was published" in rollback.stdout
        assert versions(folder) == [served, served + 1]
        assert stated(polled.repository)[PARAM_WEIGHTS_SHA256] == previous_sha
        assert is_served(polled.base, Expected(MODEL, served + 1, {PARAM_WEIGHTS_SHA256: previous_sha}))
        time.sleep(1)
    traffic.check()
    with torch.no_grad(), quiet_torchscript():
        module = torch.jit.load(str(folder / str(served + 1) / MODEL_FILE))
        expected_top = int(module(example_images(1, seed=3)).argmax())
    assert traffic.top_of(served + 1) == {expected_top}


@pytest.mark.integration
def test_a_version_triton_refuses_fails_the_job_which_rolls_it_back(polled: Polled) -> None:
    """A file every check before Triton passes but Triton cannot load (here one of two
    inputs for a config of one): the job waits, fails loudly, and puts back the version
    Triton still serves, so that Triton stops retrying the bad one and its next start loads
    what it serves now; Triton answers throughout."""
    folder = polled.repository / MODEL
    served = served_version(folder)
    assert served is not None
    before = stated(polled.repository)[PARAM_WEIGHTS_SHA256]
    with Traffic(polled.triton.http_url) as traffic:
        bad = writer(
            polled.repository, 31, "--broken", "--triton-url", polled.triton.http_url, "--triton-timeout", "4"
        )
        out = bad.communicate(timeout=120)[0]
        assert bad.returncode == 3, out
        assert "does not serve what was published after 4 s" in out
        assert f"of the versions kept, Triton has {served} ready, weights_sha256 {before[:12]}" in out
        assert f"Rolled back {MODEL} to the version Triton served before" in out
        assert "does not serve the rollback either" not in out
        assert versions(folder) == [served + 1, served + 2]
        assert stated(polled.repository)[PARAM_WEIGHTS_SHA256] == before
        assert is_served(polled.base, Expected(MODEL, served + 2, {PARAM_WEIGHTS_SHA256: before}))
        time.sleep(1)
    traffic.check()
    assert str(served + 1) not in {version for _, version, _ in traffic.answers}
    assert traffic.top_of(served + 2) == traffic.top_of(served)  # the same weights answer again
    log = polled.log_path.read_text(errors="replace")
    assert f"failed to load '{MODEL}' version {served + 1}" in log
