"""Each gateway module logs under its own name, and every line still comes out as the JSON
of service/logs.py, with the request id of the request it belongs to. Library
warnings come out as JSON too (from the review's smaller findings, issue 19)."""

from __future__ import annotations

import importlib
import io
import json
import logging
import pkgutil
import warnings
from collections.abc import Iterator

import pytest

import service
from service.app import create_app
from service.logs import configure_logging, request_id_var
from service.settings import Settings

from ..helpers import UNREACHABLE

#: Every gateway module, imported, by name.
MODULES = {
    info.name: importlib.import_module(info.name)
    for info in pkgutil.walk_packages(service.__path__, prefix="service.")
}
#: The modules that log, by name.
LOGGING = sorted(
    name for name, module in MODULES.items() if isinstance(getattr(module, "log", None), logging.Logger)
)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging replaces the handlers of the `service` logger: put them back."""
    logger = logging.getLogger("service")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.propagate = handlers, propagate
    logger.setLevel(level)


def test_module_loggers_are_named_after_their_module() -> None:
    """``getLogger(__name__)``; the access log alone has a name of its own, on purpose."""
    assert {"service.gateway", "service.inputs", "service.middleware", "service.triton"} <= set(LOGGING)
    for name, module in MODULES.items():
        loggers = {v.name for v in vars(module).values() if isinstance(v, logging.Logger)}
        assert loggers <= {name, "service.access"}, name


@pytest.mark.parametrize("module", LOGGING)
def test_module_lines_come_out_as_json(
    module: str, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("INFO", json_logs=True)
    log = importlib.import_module(module).log
    assert log.name == module
    token = request_id_var.set("req-7")
    try:
        log.warning("something happened", extra={"model": "inception_v4"})
    finally:
        request_id_var.reset(token)
    (line,) = capsys.readouterr().err.splitlines()
    entry = json.loads(line)
    assert entry["logger"] == module and entry["level"] == "warning"
    assert entry["message"] == "something happened" and entry["request_id"] == "req-7"
    assert entry["model"] == "inception_v4"


def test_library_warnings_come_out_as_json() -> None:
    """python-multipart warns about malformed bodies through `logging`; those lines, and
    Python's warnings, are JSON like every other line."""
    stream = io.StringIO()
    create_app(Settings(triton_grpc_url=UNREACHABLE))
    root = logging.getLogger()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    previous = handler.setStream(stream)
    try:
        logging.getLogger("python_multipart.multipart").warning("Skipping data after last boundary")
        with warnings.catch_warnings():  # pytest records warnings itself: route them as the app does
            warnings.simplefilter("always")
            logging.captureWarnings(False)  # an earlier app in this process captured pytest's hook
            logging.captureWarnings(True)
            warnings.warn("a library's warning", UserWarning, stacklevel=1)
    finally:
        handler.setStream(previous)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["logger"] for line in lines] == ["python_multipart.multipart", "py.warnings"]
