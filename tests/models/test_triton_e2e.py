"""End to end on a real tritonserver (the nvidia-pytriton wheel's, with the PyTorch backend
built by `make backend`) serving `model_repository/` in its CPU variant, through
tritonclient over gRPC and HTTP."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from inception.contract import NETWORKS
from inception.export import example_images, quiet_torchscript
from inception.rollout import served_model_file

from ..helpers import ROOT

pytestmark = pytest.mark.integration

BATCH = 2


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return example_images(BATCH, seed=42).numpy()


@pytest.fixture(scope="module")
def in_process(images: np.ndarray) -> dict[str, np.ndarray]:
    outputs = {}
    with quiet_torchscript(), torch.no_grad():
        for name in NETWORKS:
            module = torch.jit.load(str(served_model_file(ROOT / "model_repository", name))).eval()
            outputs[name] = module(torch.from_numpy(images)).numpy()
    return outputs


def input_names(url: str, model: str) -> list[str]:
    """The model's image inputs as Triton lists them: one for a network, one per distinct
    preprocessing for the ensemble (image__0, image__1)."""
    metadata = grpcclient.InferenceServerClient(url).get_model_metadata(model, as_json=True)
    return [i["name"] for i in metadata["inputs"]]


def infer(protocol: str, url: str, model: str, images: np.ndarray, class_count: int = 0, grpc_url: str = ""):
    """The same images in every input, so that the ensemble's members see what each
    network sees when served alone."""
    client_module = grpcclient if protocol == "grpc" else httpclient
    client = client_module.InferenceServerClient(url)
    inputs = []
    for name in input_names(grpc_url or url, model):
        inp = client_module.InferInput(name, list(images.shape), "UINT8")
        inp.set_data_from_numpy(images)
        inputs.append(inp)
    out = client_module.InferRequestedOutput("probabilities__0", class_count=class_count)
    return client.infer(model, inputs, outputs=[out]).as_numpy("probabilities__0")


@pytest.fixture(scope="module")
def served(triton, images: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    results = {}
    for protocol, url in (("grpc", triton.grpc_url), ("http", triton.http_url)):
        for model in [*NETWORKS, "inception_ensemble"]:
            results[protocol, model] = infer(protocol, url, model, images, grpc_url=triton.grpc_url)
    return results


def test_every_model_is_ready_on_the_pytorch_backend(triton) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index == dict.fromkeys([*NETWORKS, "inception_ensemble_mean", "inception_ensemble"], "READY")
    for name in [*NETWORKS, "inception_ensemble_mean"]:
        config = client.get_model_config(name, as_json=True)["config"]
        assert (config["platform"], config["backend"]) == ("pytorch_libtorch", "pytorch")
        assert [g["kind"] for g in config["instance_group"]] == ["KIND_CPU"]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", NETWORKS)
def test_each_model_equals_in_process(served, in_process, protocol: str, model: str) -> None:
    got = served[protocol, model]
    assert got.shape == (BATCH, 1000) and got.dtype == np.float32
    assert float(np.abs(got - in_process[model]).max()) <= 1e-4


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ensemble_is_the_weighted_mean_of_its_members(triton, served, protocol: str) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    config = client.get_model_config("inception_ensemble", as_json=True)
    params = {k: v.get("string_value", "") for k, v in config["config"]["parameters"].items()}
    members = params["members"].split(",")
    weights = [float(w) for w in params["member_weights"].split(",")]
    expected = sum(w * served[protocol, m] for m, w in zip(members, weights, strict=True))
    assert float(np.abs(served[protocol, "inception_ensemble"] - expected).max()) <= 1e-5


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_classification_extension_answers_label_names(triton, served, images, protocol: str) -> None:
    labels = (ROOT / "inception" / "data" / "imagenet_labels.txt").read_text().splitlines()
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    for model in ("inception_v4", "inception_ensemble"):
        top = infer(protocol, url, model, images, class_count=3, grpc_url=triton.grpc_url)
        assert top.shape == (BATCH, 3)
        for row, probs in zip(top, served[protocol, model], strict=True):
            entries = [entry.decode().split(":", 2) for entry in row]
            ids = [int(index) for _, index, _ in entries]
            assert ids == list(np.argsort(-probs, kind="stable")[:3]) or sorted(probs[ids]) == sorted(
                np.sort(probs)[-3:]
            )
            assert [label for _, _, label in entries] == [labels[i] for i in ids]
            assert [float(score) for score, _, _ in entries] == pytest.approx(list(probs[ids]), rel=1e-3)


def test_dynamic_batcher_forms_batches_under_concurrency(triton) -> None:
    model = "inception_resnet_v1"
    client = grpcclient.InferenceServerClient(triton.grpc_url)

    def counts() -> tuple[int, int]:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))

    inferences_before, executions_before = counts()
    single = example_images(1, seed=5).numpy()
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(lambda _: infer("grpc", triton.grpc_url, model, single), range(12)))
    assert all(r.shape == (1, 1000) for r in results)
    # Triton records statistics after it has sent the responses: poll briefly.
    deadline = time.monotonic() + 30
    inferences, executions = counts()
    while inferences - inferences_before < 12 and time.monotonic() < deadline:
        time.sleep(0.2)
        inferences, executions = counts()
    assert inferences - inferences_before == 12
    assert executions - executions_before < 12, "no request was batched with another"
