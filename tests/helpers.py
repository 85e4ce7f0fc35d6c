"""What every test folder shares: where the checkout is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "model_repository"


@dataclass(frozen=True)
class TritonEndpoint:
    """The Triton that the gateways of the tests talk to."""

    grpc_url: str
