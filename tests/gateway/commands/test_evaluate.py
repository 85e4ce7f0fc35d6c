"""`python -m evaluation` on a small labelled folder built here from the packaged
photos, against the real gateway and Triton; the numbers against a hand computation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from evaluation.imagenet import PAPER, Score, discover, parse_label, synsets

from ...helpers import ROOT
from ..helpers import MODEL, GatewayProcess, classify, photo


def test_synsets_are_timms_class_order() -> None:
    names = synsets()
    assert len(names) == 1000 == len(set(names)) and names[0] == "n01440764" and names[999] == "n15075141"
    timm_info = pytest.importorskip("inception.labels")._timm_info_dir()
    assert names == (timm_info / "imagenet_synsets.txt").read_text().split()


def test_labels_are_synsets_or_indices() -> None:
    index_of = {s: i for i, s in enumerate(synsets())}
    assert parse_label("n01440764", index_of) == 0 and parse_label("999", index_of) == 999
    for bad in ("n99999999", "1000", "cat", "-1"):
        with pytest.raises(ValueError):
            parse_label(bad, index_of)


def test_score_arithmetic() -> None:
    score = Score("inception_v4", 1)
    score.record(7, [7, 1, 2, 3, 4])  # top-1 hit
    score.record(3, [7, 1, 2, 3, 4])  # top-5 hit
    score.record(9, [7, 1, 2, 3, 4])  # miss
    score.record(9, [])  # a failure is a miss
    assert (score.top1_error, score.top5_error) == (75.0, 50.0)
    assert score.paper() == PAPER["inception_v4"][1]
    assert Score("inception_v4", 10).paper() == PAPER["inception_v4"][12]  # nearest: the paper's 12 crops


def test_discover_refuses_unknown_folders_and_empty_ones(tmp_path: Path) -> None:
    (tmp_path / "kittens").mkdir()
    shutil.copy(photo("chelsea.png"), tmp_path / "kittens" / "a.png")
    with pytest.raises(ValueError, match="kittens"):
        discover(tmp_path)
    with pytest.raises(ValueError, match="no labelled images"):
        discover(tmp_path / "kittens")


PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg"]


def _ranked(client: httpx.Client, name: str, crops: int) -> list[int]:
    answer = classify(client, photo(name).read_bytes(), "image/*", model=MODEL, top_k=5, crops=crops)
    assert answer.status_code == 200, answer.text
    return [p["class_id"] for p in answer.json()["predictions"]]


@pytest.mark.integration
def test_evaluate_through_the_gateway_equals_a_hand_computation(
    gateway: GatewayProcess, client: httpx.Client, tmp_path: Path
) -> None:
    """Each photo is labelled from the gateway's own single-crop answer: the first with its
    top-1 class, the second with its third class, the third with a class outside its top 5.
    At one crop that is 2 of 3 top-1 misses and 1 of 3 top-5 misses by construction; at 10
    crops the expected figures come from the 10-crop answers, counted here by hand."""
    ranked = {name: _ranked(client, name, 1) for name in PHOTOS}
    outside = next(c for c in range(1000) if c not in ranked["rocket.jpg"])
    labels = {
        "chelsea.png": ranked["chelsea.png"][0],
        "coffee.png": ranked["coffee.png"][2],
        "rocket.jpg": outside,
    }
    names = synsets()
    folder = tmp_path / "val"
    # Two layouts at once: synset folders and class-index folders.
    for k, (name, label) in enumerate(labels.items()):
        sub = folder / (names[label] if k % 2 == 0 else str(label))
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo(name), sub / name)
    ten = {name: _ranked(client, name, 10) for name in PHOTOS}
    expected_ten = Score(MODEL, 10)
    for name, label in labels.items():
        expected_ten.record(label, ten[name])

    out = tmp_path / "results.json"
    table = tmp_path / "results.md"
    result = subprocess.run(
        [sys.executable, "-m", "evaluation", "--folder", str(folder), "--url", gateway.url,
         "--models", MODEL, "--crops", "1,10", "--json", str(out), "--markdown", str(table)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "images/s" in result.stderr and "3/3" in result.stderr  # the progress bar
    rows = {r["crops"]: r for r in json.loads(out.read_text())["results"]}
    assert rows[1]["images"] == 3 and rows[1]["failures"] == 0
    assert rows[1]["top1_error"] == pytest.approx(100 * 2 / 3, abs=1e-3)
    assert rows[1]["top5_error"] == pytest.approx(100 * 1 / 3, abs=1e-3)
    assert rows[10]["top1_error"] == pytest.approx(expected_ten.top1_error, abs=1e-3)
    assert rows[10]["top5_error"] == pytest.approx(expected_ten.top5_error, abs=1e-3)
    assert rows[1]["paper"] == {"source": "Table 2", "crops": 1, "top1_error": 21.3, "top5_error": 5.5}
    assert (
        table.read_text() == result.stdout
        and "| inception_resnet_v1 | 1 | 3 | 66.67 | 33.33 |" in result.stdout
    )

    # The same folder as a labels CSV (with a header line), paths relative to the folder.
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "path,label\n"
        + "".join(f"{p.relative_to(folder)},{labels[p.name]}\n" for p in sorted(folder.rglob("*.*")))
    )
    again = subprocess.run(
        [sys.executable, "-m", "evaluation", "--folder", str(folder), "--labels", str(csv),
         "--url", gateway.url, "--models", MODEL, "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "| inception_resnet_v1 | 1 | 3 | 66.67 | 33.33 |" in again.stdout


@pytest.mark.integration
def test_evaluate_local_runs_without_a_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--local`: the gateway's preprocessing and the eager network in this process (the
    cheapest network, its deterministic random initialisation); the same construction of
    labels from its own answers gives the same hand-computed figures."""
    from evaluation.imagenet import local_classifier, main

    classify_here = local_classifier({})
    ranked = {name: classify_here(photo(name), MODEL, 1) for name in PHOTOS}
    assert all(len(r) == 5 and len(set(r)) == 5 for r in ranked.values())
    outside = next(c for c in range(1000) if c not in ranked["rocket.jpg"])
    labels = {
        "chelsea.png": ranked["chelsea.png"][0],
        "coffee.png": ranked["coffee.png"][2],
        "rocket.jpg": outside,
    }
    folder = tmp_path / "val"
    for name, label in labels.items():
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo(name), folder / str(label) / name)
    out = tmp_path / "local.json"
    assert main(["--folder", str(folder), "--local", "--models", MODEL, "--json", str(out), "--quiet"]) == 0
    assert "| inception_resnet_v1 | 1 | 3 | 66.67 | 33.33 |" in capsys.readouterr().out
    assert json.loads(out.read_text())["results"][0]["failures"] == 0
