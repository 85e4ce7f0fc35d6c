"""The GPU kit and the device command, exercised here without a GPU: the kit's trimming and
manifest on the real `nvidia-pytriton` wheel, its wheel list against the dependencies, the
offline install, the load client's counting, and (integration) the whole device command in
its CPU dry run, served by the kit's own trimmed tritonserver."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench.gateway import is_shed
from bench.gpu import install, load
from bench.gpu import kit as builder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def staged_server(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    dest = tmp_path_factory.mktemp("server")
    return dest, builder.stage_server(builder.pytriton_site(), dest)


def test_trimmed_server_holds_the_needed_closure_and_not_the_python_backend(
    staged_server: tuple[Path, dict[str, object]],
) -> None:
    dest, info = staged_server
    libs = dest / builder.SERVER_LIBS
    staged = {p.name for p in libs.iterdir()}
    assert (dest / builder.SERVER_BINARY).is_file()
    assert any(n.startswith("libtritonserver") for n in staged)
    assert any(n.startswith("libcudart") for n in staged), "the GPU build's CUDA 12 runtime"
    assert not any(n.startswith("libpython") for n in staged)
    assert not (dest / "pytriton" / "tritonserver" / "backends" / "python").exists()
    left_out = info["left_out"]
    assert isinstance(left_out, list) and any(n.startswith("libpython") for n in left_out)
    # Closed: every library any staged file needs is staged or left to the host's glibc & co.
    host = set(info["host_libraries"])  # type: ignore[call-overload]
    assert {"libc.so.6", "libstdc++.so.6"} <= host
    for path in [dest / builder.SERVER_BINARY, *libs.iterdir()]:
        for needed in builder.elf_needed(path):
            assert needed in staged or needed in host, f"{path.name} needs {needed}"
    assert not any(name.startswith("libtriton") or name.startswith("libcudart") for name in host)


def test_library_closure_follows_needed_and_leaves_unknown_names_to_the_host(
    staged_server: tuple[Path, dict[str, object]],
) -> None:
    dest, _ = staged_server
    libs = dest / builder.SERVER_LIBS
    server_lib = next(p for p in libs.iterdir() if p.name.startswith("libtritonserver"))
    closure = builder.library_closure([server_lib], [libs])
    assert server_lib.name not in closure.carried  # roots are not their own dependencies
    assert set(builder.elf_needed(server_lib)) <= set(closure.carried) | closure.host
    assert builder.library_closure([server_lib], []).carried == {}


def test_size_over_the_limit_fails_loudly() -> None:
    builder.check_size(60 * 2**20, builder.LIMIT_BYTES)
    with pytest.raises(builder.KitError, match=r"60\.0 MiB, over its limit of 60 MiB"):
        builder.check_size(60 * 2**20 + 1, builder.LIMIT_BYTES)


def test_builder_replaces_a_kit_but_no_other_folder(tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("mine")
    with pytest.raises(builder.KitError, match="holds no kit"):
        builder.build_kit(tmp_path / "precious", tmp_path / "cache", ["photos"])
    assert (tmp_path / "precious" / "notes.txt").read_text() == "mine"


def test_kit_over_its_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(builder.KitError, match="over its limit"):
        builder.build_kit(tmp_path / "kit", tmp_path / "cache", ["photos"], limit=100_000)


def test_manifest_lists_every_file_and_the_install_finds_damage(tmp_path: Path) -> None:
    kit = tmp_path / "kit"
    manifest = builder.build_kit(kit, tmp_path / "cache", ["photos"])
    photos = manifest["pieces"]["photos"]
    sizes = {(p["width"], p["height"]) for p in photos}
    assert {(500, 375), (1024, 768), (2048, 1536)} <= sizes
    assert set(manifest["files"]) == {p["path"] for p in photos}
    assert manifest["total_bytes"] == sum(f["bytes"] for f in manifest["files"].values())
    assert install.verify(kit, install.read_manifest(kit)) == []
    victim = kit / photos[0]["path"]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    assert install.verify(kit, manifest) == [f"{photos[0]['path']}: sha256 differs"]
    victim.unlink()
    assert install.verify(kit, manifest) == [f"{photos[0]['path']}: missing"]


def test_kit_carries_whatever_the_gpu_machine_lacks() -> None:
    """Every distribution the gateway and tritonclient pull in (as installed here, markers
    read for Python 3.12) is carried or on the machine's package list; and the carried
    ones are installed here, at the versions the tests run."""
    closure = builder.requirement_closure(builder.TOP_LEVEL)
    assert {"fastapi", "starlette", "pydantic-core", "tritonclient", "grpcio"} <= set(closure)
    assert builder.missing_from_kit(closure, builder.CARRIED, builder.DEVICE_PACKAGES) == []
    assert builder.missing_from_kit(closure, [], builder.DEVICE_PACKAGES)  # the kit matters
    assert set(builder.installed_pins(builder.CARRIED)) == {builder.normalise(n) for n in builder.CARRIED}
    assert "torch" not in closure


def _probe_wheel(folder: Path, name: str = "gpu_kit_probe") -> Path:
    """A pure-Python wheel no machine has installed."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    dist = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{name}.py", "ANSWER = 42\n")
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        zf.writestr(
            f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{dist}/RECORD", "")
    return wheel


def test_install_takes_only_the_wheels_this_machine_lacks(tmp_path: Path) -> None:
    kit = tmp_path / "kit"
    wheels = kit / "wheels"
    _probe_wheel(wheels)
    # A second carried wheel of something this environment already satisfies.
    _probe_wheel(wheels, "packaging")
    (wheels / "requirements.txt").write_text("gpu_kit_probe==1.0\npackaging\n")
    manifest = {"pieces": {"wheels": {"path": "wheels", "requirements": "wheels/requirements.txt"}}}
    site = tmp_path / "work" / "site"
    result = install.install_wheels(kit, manifest, site)
    assert result["installed"] == ["gpu_kit_probe-1.0-py3-none-any.whl"], result
    assert "resolver" in result["decided_by"]
    env = install.Environment(pythonpath=[str(site)]).apply(os.environ)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import gpu_kit_probe, packaging; print(gpu_kit_probe.ANSWER, packaging.__file__)",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    answer, packaging_file = done.stdout.split()
    assert answer == "42" and not packaging_file.startswith(str(site))


def test_environment_puts_its_paths_first() -> None:
    env = install.Environment(["/kit/site", "/repo"], ["/server/libs"])
    applied = env.apply({"PYTHONPATH": "/theirs", "LD_LIBRARY_PATH": ""})
    assert applied["PYTHONPATH"] == os.pathsep.join(["/kit/site", "/repo", "/theirs"])
    assert applied["LD_LIBRARY_PATH"] == "/server/libs"


def test_gpu_backend_check_names_what_is_wrong() -> None:
    good = ":".join(["$ORIGIN", *builder.DEVICE_RUNPATH])
    builder.check_gpu_backend(["libtorch.so", "libcudart.so.13", "libc.so.6"], good)
    with pytest.raises(builder.KitError) as error:
        builder.check_gpu_backend(
            ["libtorch.so", "libcudart.so.12", "libtritonserver.so"], "$ORIGIN:/elsewhere"
        )
    message = str(error.value)
    assert "libcudart.so.13" in message and "libtritonserver" in message and "RUNPATH" in message


def test_load_counts_answers_sheds_and_errors_apart() -> None:
    outcomes = iter(
        [
            load.Outcome("ok", images=2, timing_ms={"decode": 1.0, "triton": 3.0, "total": 5.0}),
            load.Outcome("shed"),
            load.Outcome("shed", detail="no Retry-After"),
            load.Outcome("error", detail="HTTP 500"),
        ]
    )

    async def call() -> load.Outcome:
        await asyncio.sleep(0.01)
        try:
            return next(outcomes)
        except StopIteration:
            raise ConnectionError("refused") from None

    import time

    result = asyncio.run(load.closed_loop(call, 1, time.time(), 0.0, 0.3))
    summary = result.summary()
    assert (summary["answered"], summary["images"], summary["shed"], summary["errors"]) == (
        1,
        2,
        2,
        1 + summary["error_kinds"].get("ConnectionError", 0),
    )
    assert summary["shed_without_retry_after"] == 1
    assert summary["error_kinds"]["HTTP 500"] == 1
    assert summary["decode_share"] == pytest.approx(0.2) and summary["triton_share"] == pytest.approx(0.6)


def test_gateway_bench_tells_sheds_from_errors() -> None:
    assert is_shed(503, {"Retry-After": "1"})
    assert is_shed(429, {"retry-after": "2"})
    assert not is_shed(503, {})
    assert not is_shed(500, {"Retry-After": "1"})


@pytest.mark.integration
def test_cpu_dry_run_serves_and_measures_every_stage(tmp_path: Path) -> None:
    """The device command end to end on the CPU, from a kit with the trimmed tritonserver
    and photos (the GPU backend and the wheels need downloads the tests do not make)."""
    kit = tmp_path / "kit"
    builder.build_kit(kit, tmp_path / "cache", ["server", "photos"], preset=0)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu.stack", "--cpu-dry-run", "--kit", str(kit), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads((out / "gpu_stack.json").read_text())
    stages = results["stages"]
    assert {n: s["status"] for n, s in stages.items()} == dict.fromkeys(
        [
            "install",
            "environment",
            "export",
            "triton",
            "accuracy",
            "side_by_side",
            "gateway",
            "tuning",
            "winner",
        ],
        "ok",
    )
    # Served by the kit's own trimmed tritonserver, unpacked from the archive.
    assert stages["install"]["server"].endswith("pytriton/tritonserver/bin/tritonserver")
    assert "/server/" in stages["install"]["server"]
    assert (
        stages["accuracy"]["inception_resnet_v1"]["passed"]
        and stages["accuracy"]["inception_ensemble"]["passed"]
    )
    rows = stages["side_by_side"]["rows"]
    assert [(r["batch"], r["clients"]) for r in rows] == [(1, 1), (1, 2), (2, 2)]
    for row in rows:
        assert row["triton"]["errors"] == 0 and row["triton"]["images_per_s"] > 0
        assert row["in_process"]["images_per_s"] > 0
    gateway = stages["gateway"]["rows"]
    assert {(r["model"], r["admission"]) for r in gateway} == {
        ("inception_resnet_v1", False),
        ("inception_resnet_v1", True),
        ("ensemble", False),
        ("ensemble", True),
    }
    for row in gateway:
        assert row["answered"] > 0 and row["errors"] == 0, row
        assert set(row["stage_ms_mean"]) >= {"decode", "triton", "total"}
        assert 0 < row["triton_share"] < 1
    tuning = stages["tuning"]
    assert set(tuning["variants"]) == {"fp32 (today)", "fp16 channels_last+benchmark"}
    fast = tuning["variants"]["fp16 channels_last+benchmark"]
    assert fast["graph"]["conv_benchmark"] == {"True": fast["graph"]["weights_4d"]}
    assert fast["graph"]["weights_nchw_only"] == 0
    assert tuning["variants"]["fp32 (today)"]["graph"]["weights_nchw_only"] > 0
    assert fast["agreement"]["reference_distinct_top1"] > 1, (
        "calibrated batch norms: answers depend on the photo"
    )
    winner = stages["winner"]
    assert winner["accuracy"]["passed"] and winner["rows"]
    report = (out / "gpu_stack.md").read_text()
    for heading in ("Triton (gRPC, dynamic batching) against in-process", "The gateway end to end", "Tuning"):
        assert heading in report
    log = (out / "tritonserver.log").read_text()
    assert "successfully loaded 'inception_resnet_v1'" in log
    assert (out / "tritonserver-winner.log").is_file()


def test_symbol_check_resolves_a_backend_against_its_torch(tmp_path: Path) -> None:
    """The check `make gpu-kit` makes of the GPU backend, made of a copy of the CPU one that
    looks for torch only where it is told (as the GPU one, whose RUNPATH names the other
    machine): every symbol but Triton's API resolves against the torch it was built for."""
    import shutil

    from embedded import backend

    library = backend.installed_library()
    assert library is not None, "run `make backend`"
    copy = tmp_path / library.name
    shutil.copyfile(library, copy)
    subprocess.run(["patchelf", "--set-rpath", "$ORIGIN", str(copy)], check=True)
    linkage = builder.symbol_check(copy, [backend.find_torch().lib])
    assert linkage["checked"] and linkage["triton_api_symbols"] > 10
    assert linkage["libraries_not_found_here"] == []
    unfound = builder.symbol_check(copy, [])
    assert not unfound["checked"] and unfound["libraries_not_found_here"] == ["libtorch.so"]
