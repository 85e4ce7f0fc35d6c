"""Hub weights are pinned (issue 25, item 5): every network with a hub checkpoint names the
exact commit to download, that commit is what `hf_hub_download` is asked for, and the
provenance says which commit was served, so a changed upstream never ships unannounced.

No test reaches the hub: the download function is replaced, or the real `huggingface_hub`
is pointed at a local cache (offline) or at a local server, and checkpoints are files the
tests make themselves."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file
from torch import nn

from inception import CheckpointError, get_spec, list_models
from inception.export import resolve_weights
from inception.registry import ModelSpec, RegistryError
from inception.weights import hub_cache_source, hub_checkpoint, load_weights

from ..helpers import ROOT

HUB_NETWORKS = [name for name in list_models() if get_spec(name).has_public_checkpoint]


def tiny_spec(**changes: object) -> ModelSpec:
    """A spec of a two-weight network: what loading and provenance do, without building a
    whole Inception."""
    fields: dict = {
        "name": "tiny",
        "builder": lambda num_classes: nn.Linear(2, num_classes),
        "input_size": 8,
        "crop_pct": 1.0,
        "num_params": 9,
        "gmacs": 0.0,
        "num_classes": 3,
        "hub_repo": "someone/tiny.in1k",
        "hub_revision": "0123456789abcdef0123456789abcdef01234567",
    }
    return ModelSpec(**{**fields, **changes})


def cached_checkpoint(cache: Path, repo: str, revision: str, state: dict[str, torch.Tensor]) -> Path:
    """A file where huggingface_hub's cache keeps `model.safetensors` of `repo` at `revision`."""
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    path = snapshot / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_every_hub_network_is_pinned_to_a_commit() -> None:
    assert HUB_NETWORKS == ["inception_v4", "inception_resnet_v2"]
    for name in HUB_NETWORKS:
        revision = get_spec(name).hub_revision
        assert revision is not None and len(revision) == 40 and int(revision, 16) >= 0, (name, revision)
    assert get_spec("inception_resnet_v1").hub_revision is None  # nothing published to pin


@pytest.mark.parametrize(
    "revision", [None, "main", "v1.0", "12b1502", "12B15021195C5382BA33B3D58959D5001631368F"]
)
def test_a_hub_checkpoint_without_a_full_commit_id_is_refused(revision: str | None) -> None:
    """A branch, a tag or a short id can move or be ambiguous: the spec does not import."""
    with pytest.raises(RegistryError, match="hub_revision"):
        tiny_spec(hub_revision=revision)
    with pytest.raises(RegistryError, match="without hub_repo"):
        tiny_spec(hub_repo=None)


@pytest.mark.parametrize("name", HUB_NETWORKS)
def test_the_download_asks_for_the_pinned_revision(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    calls: list[dict[str, str]] = []

    def fake_download(**kwargs: str) -> str:  # stands in for the network only
        calls.append(kwargs)
        return "/nowhere/model.safetensors"

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    spec = get_spec(name)
    assert hub_checkpoint(spec) == Path("/nowhere/model.safetensors")
    expected = {"repo_id": spec.hub_repo, "filename": "model.safetensors", "revision": spec.hub_revision}
    assert calls == [expected]


def test_the_provenance_names_repository_and_commit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = tiny_spec()
    model = spec.builder(num_classes=3)
    assert spec.hub_repo and spec.hub_revision
    path = cached_checkpoint(tmp_path, spec.hub_repo, spec.hub_revision, model.state_dict())
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kwargs: str(path))
    info = load_weights(spec.builder(num_classes=3), spec, "hub")
    assert info.provenance == f"pretrained:hf-hub:someone/tiny.in1k@{spec.hub_revision}"
    # The exporter passes the downloaded file's path on: it reads the same provenance.
    assert load_weights(spec.builder(num_classes=3), spec, path).provenance == info.provenance
    # Any other file is named by its file name, as before.
    other = tmp_path / "mine.safetensors"
    save_file(model.state_dict(), str(other))
    assert load_weights(spec.builder(num_classes=3), spec, other).provenance == "pretrained:mine.safetensors"


@pytest.mark.parametrize(
    "path",
    [
        "/data/model.safetensors",
        "/cache/models--timm--x/snapshots/main/model.safetensors",  # a branch is no commit
        "/cache/models--timm--x/blobs/0123456789abcdef0123456789abcdef01234567",
        "/cache/datasets--timm--x/snapshots/0123456789abcdef0123456789abcdef01234567/model.safetensors",
        "/cache/models--x/snapshots/0123456789abcdef0123456789abcdef01234567/model.safetensors",
    ],
)
def test_only_a_commit_snapshot_of_the_hub_cache_is_a_hub_source(path: str) -> None:
    assert hub_cache_source(Path(path)) is None


@pytest.fixture
def offline_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """huggingface_hub itself, offline, with its cache in a temporary folder."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("name", HUB_NETWORKS)
def test_the_export_serves_the_pinned_commit_from_the_real_client(offline_cache: Path, name: str) -> None:
    """The exporter's choice, through the real `hf_hub_download`: the cached file of the
    pinned commit is taken, and its path carries the provenance the export records."""
    spec = get_spec(name)
    assert spec.hub_repo and spec.hub_revision
    cached_checkpoint(offline_cache, spec.hub_repo, spec.hub_revision, {"w": torch.zeros(1)})
    choice = resolve_weights(name, {}, "always", True)
    assert choice.weights is not None
    path = Path(choice.weights)
    assert path.parent.name == spec.hub_revision
    assert hub_cache_source(path) == f"hf-hub:{spec.hub_repo}@{spec.hub_revision}"


def test_another_commit_in_the_cache_is_not_used(offline_cache: Path) -> None:
    """Upstream moved on and the cache holds only the newer commit: the pinned one is asked
    for, and, offline, the download fails rather than serving the other."""
    spec = get_spec("inception_v4")
    assert spec.hub_repo
    cached_checkpoint(offline_cache, spec.hub_repo, "f" * 40, {"w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"cannot download timm/inception_v4\.tf_in1k"):
        resolve_weights("inception_v4", {}, "always", True)


@pytest.fixture
def hub_that_knows_nothing() -> Iterator[tuple[str, list[str]]]:
    """A local server in the hub's place that answers 404 to everything: its URL, and the
    paths it was asked for."""
    paths: list[str] = []

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            paths.append(self.path)
            self.send_error(404)

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", paths
    finally:
        server.shutdown()
        server.server_close()


def test_the_real_client_requests_the_pinned_commit(
    hub_that_knows_nothing: tuple[str, list[str]], tmp_path: Path
) -> None:
    """The URL `huggingface_hub` builds names the commit, not `main`. In a fresh process,
    because the client reads HF_ENDPOINT once, at its import."""
    endpoint, paths = hub_that_knows_nothing
    code = (
        "from inception import get_spec; from inception.weights import hub_checkpoint; "
        "hub_checkpoint(get_spec('inception_resnet_v2'))"
    )
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
    )
    assert result.returncode != 0, "a hub that knows nothing gave a checkpoint"
    spec = get_spec("inception_resnet_v2")
    expected = f"/{spec.hub_repo}/resolve/{spec.hub_revision}/model.safetensors"
    downloads = {path for path in paths if "/resolve/" in path}  # the client asks other things too
    assert downloads == {expected}, (paths, result.stderr[-2000:])
