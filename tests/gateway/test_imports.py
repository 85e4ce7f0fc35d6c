"""The gateway installs without torch: nothing it imports may pull torch in. And the
dependency runs one way: the model package never imports the gateway."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from ..helpers import ROOT

# The one torch-free module of the `inception` package that the gateway shares.
ALLOWED_FROM_INCEPTION = {"inception.contract"}


@pytest.mark.parametrize("package", ["service", "embedded"])
def test_static_imports_avoid_torch(package: str) -> None:
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                module = node.module or ""
                # `from inception import contract` imports the module inception.contract.
                names = [f"{module}.{a.name}" for a in node.names] if module == "inception" else [module]
            for name in names:
                assert name.split(".")[0] not in ("torch", "timm", "torchvision"), (path, name)
                if name.split(".")[0] == "inception":
                    assert name in ALLOWED_FROM_INCEPTION, (path, name)


def test_importing_the_gateway_and_launchers_loads_no_torch() -> None:
    code = (
        "import sys, service.app, service.routes.classify, embedded.serve, embedded.backend;"
        "service.app.create_app;"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_model_package_imports_nothing_of_the_gateway() -> None:
    """`evaluation` may use both; `inception` is below `service` and must stay so."""
    for path in (ROOT / "inception").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] in ("service", "evaluation", "embedded") for n in names), (
                path,
                names,
            )
