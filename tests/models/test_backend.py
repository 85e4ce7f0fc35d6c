"""The PyTorch backend that `make backend` builds, and the launcher's errors when a backend
or a model file is wrong: each names what is wrong and what to do."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from embedded import backend
from embedded.tritonserver import TritonError, TritonServer

MODEL = "inception_resnet_v1"


@pytest.fixture(scope="module")
def library() -> Path:
    found = backend.installed_library()
    if found is None:
        pytest.fail("no PyTorch backend: run `make backend` (make test does)")
    return found


def test_built_library_links_the_venvs_torch_and_not_a_server_library(library: Path) -> None:
    needed = subprocess.run(
        ["patchelf", "--print-needed", str(library)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "libtorch.so" in needed or "libtorch_cpu.so" in needed
    assert not [n for n in needed if n.startswith("libtritonserver")]
    rpath = subprocess.run(
        ["patchelf", "--print-rpath", str(library)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert rpath.split(":") == ["$ORIGIN", str(backend.find_torch().lib)]


def test_second_build_reuses_the_cached_library(library: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = library.resolve().stat().st_mtime_ns
    assert backend.main(["--offline"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert library.resolve().stat().st_mtime_ns == before


def test_fingerprint_follows_torch_and_flags(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(b"x")
    torch = backend.Torch("2.14.1", tmp_path, "1")
    key = backend.fingerprint({"core": archive}, torch, {"cmake": "3.25"}, ["-DX=1"])
    assert key == backend.fingerprint({"core": archive}, torch, {"cmake": "3.25"}, ["-DX=1"])
    assert key != backend.fingerprint(
        {"core": archive}, backend.Torch("2.13.0", tmp_path, "1"), {"cmake": "3.25"}, ["-DX=1"]
    )
    assert key != backend.fingerprint({"core": archive}, torch, {"cmake": "3.25"}, ["-DX=2"])
    archive.write_bytes(b"y")
    assert key != backend.fingerprint({"core": archive}, torch, {"cmake": "3.25"}, ["-DX=1"])


def test_missing_source_without_download_names_the_archive_and_the_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend, "DOWNLOAD_CACHE", tmp_path / "cache")
    with pytest.raises(backend.BuildError) as error:
        backend.locate_sources(tmp_path, download=False)
    message = str(error.value)
    assert f"pytorch_backend-{backend.PINNED_COMMITS['pytorch_backend']}.tar.gz" in message
    assert "github.com/triton-inference-server/pytorch_backend/archive/" in message


def test_missing_tool_names_it_and_the_debian_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.which
    monkeypatch.setattr(backend.shutil, "which", lambda tool: None if tool == "patchelf" else real(tool))
    with pytest.raises(backend.BuildError) as error:
        backend.check_tools()
    assert "patchelf" in str(error.value) and "apt-get install" in str(error.value)


def test_foreign_archive_is_refused(tmp_path: Path) -> None:
    import tarfile

    archive = tmp_path / "core.tar.gz"
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "x").write_text("x")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "evil", arcname="evil")
    with pytest.raises(backend.BuildError, match="is not the archive of core"):
        backend.extract({"core": archive}, tmp_path / "out")


@pytest.mark.integration
def test_missing_backend_is_a_clear_error(repository: Path, tmp_path: Path) -> None:
    server = TritonServer(repository, backend_directory=tmp_path / "nothing-here")
    with pytest.raises(TritonError, match=r"no PyTorch backend at .*make backend"):
        server.start()
    assert server.process is None


@pytest.mark.integration
def test_bad_model_file_is_a_clear_error(repository: Path, tmp_path: Path) -> None:
    """A model.pt that is not TorchScript: the launcher fails, quoting Triton's reason."""
    source = repository / MODEL
    broken = tmp_path / "repository" / MODEL
    (broken / "configs").mkdir(parents=True)
    (broken / "1").mkdir()
    for name in ("config.pbtxt", "configs/cpu.pbtxt", "labels.txt"):
        shutil.copyfile(source / name, broken / name)
    (broken / "1" / "model.pt").write_bytes(b"this is not a TorchScript archive")
    server = TritonServer(broken.parent, log_path=tmp_path / "tritonserver.log")
    try:
        with pytest.raises(TritonError) as error:
            server.start().wait_ready(timeout=120)
    finally:
        server.stop()
    message = str(error.value)
    assert MODEL in message and "failed to load" in message, message
    assert "frame #" not in message, "the reason, not libtorch's C++ stack trace"
    assert "log:" in message


def test_unpacked_torch_is_read_from_its_files(tmp_path: Path) -> None:
    """`--torch-root`: a wheel's torch/ folder, unpacked and never imported."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libtorch.so").write_bytes(b"")
    (tmp_path / "lib" / "libc10.so").write_bytes(b"...__cxx11...")
    (tmp_path / "version.py").write_text("__version__ = '2.11.0+cu130'\ngit_version = 'x'\n")
    torch = backend.find_torch(tmp_path)
    assert (torch.version, torch.root, torch.cxx11_abi) == ("2.11.0+cu130", tmp_path.resolve(), "1")
    (tmp_path / "version.py").unlink()
    with pytest.raises(backend.BuildError, match="not a torch package folder"):
        backend.find_torch(tmp_path)


def test_gpu_build_has_its_own_flags_runpath_and_fingerprint(tmp_path: Path) -> None:
    torch = backend.Torch("2.11.0+cu130", tmp_path, "1")
    sources = {repo: Path(f"<{repo}>") for repo in backend.PINNED_COMMITS}
    cpu = backend.cmake_flags(torch, tmp_path, sources)
    gpu = backend.cmake_flags(torch, tmp_path, sources, backend.Gpu(Path("/opt/cuda"), "90-real"))
    assert "-DTRITON_ENABLE_GPU=OFF" in cpu and "-DTRITON_ENABLE_GPU=ON" not in cpu
    assert {"-DTRITON_ENABLE_GPU=ON", "-DCMAKE_CUDA_COMPILER=/opt/cuda/bin/nvcc"} <= set(gpu)
    assert "-DCMAKE_CUDA_ARCHITECTURES=90-real" in gpu
    assert backend.runpath(torch) == f"$ORIGIN:{tmp_path / 'lib'}"
    there = backend.runpath(torch, ["/there/torch/lib", "/there/nvidia/cu13/lib"])
    assert there == "$ORIGIN:/there/torch/lib:/there/nvidia/cu13/lib"
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(b"x")
    tools = {"cmake": "3.25"}
    keys = {
        backend.fingerprint({"core": archive}, torch, tools, cpu),
        backend.fingerprint({"core": archive}, torch, tools, gpu),
        backend.fingerprint({"core": archive}, torch, tools, gpu, there),
    }
    assert len(keys) == 3


def test_kernel_architectures_are_trimmed_in_the_extracted_backend(tmp_path: Path) -> None:
    """CUDA 13 refuses the 5.3-7.2 targets r24.10's kernel lists; the copy gets the given list."""
    archives = backend.locate_sources(backend.default_sources(), download=False)
    roots = backend.extract({"backend": archives["backend"]}, tmp_path)
    cmakelists = roots["backend"] / "CMakeLists.txt"
    assert '"53;60-real;62-real;70-real;72-real;75-real' in cmakelists.read_text()
    backend.trim_cuda_architectures(roots["backend"], backend.DEFAULT_CUDA_ARCHITECTURES)
    text = cmakelists.read_text()
    assert f'CUDA_ARCHITECTURES "{backend.DEFAULT_CUDA_ARCHITECTURES}")' in text
    assert "53;" not in text
    (tmp_path / "changed").mkdir()
    (tmp_path / "changed" / "CMakeLists.txt").write_text("add_library(kernel_library_new src/kernel.cu)\n")
    with pytest.raises(backend.BuildError, match="CUDA_ARCHITECTURES line was not found"):
        backend.trim_cuda_architectures(tmp_path / "changed", "90-real")
