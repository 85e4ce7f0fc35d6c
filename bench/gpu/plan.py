"""What one run of `python -m bench.gpu.stack` measures, and how long each stage may take:
the GPU plan, and the CPU dry run's tiny one.

The networks are the contract's (`inception/contract.py`), the one list every side of the
project follows: a network added there is exported, served and measured here without an
edit. A plan only picks among them the one the tuning variants are made of and the one the
gateway serves by default (the dry run: one network, so an export takes seconds).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from inception.contract import NETWORKS


@dataclass(frozen=True)
class Plan:
    """What one run measures, and how long each stage may take (seconds)."""

    device: str
    config_name: str
    networks: tuple[str, ...]
    tuned: str  # the network the variants are made of
    gateway_model: str
    batches: tuple[int, ...]
    fill: int  # images in flight that fill the batcher: concurrency = fill // batch
    load_seconds: float
    load_warmup: float
    inprocess_seconds: float
    warmup_calls: int  # in-process, per module and batch size, before timing
    blocks: int  # in-process throughput: median of this many blocks
    start_delay: float  # load clients start together this long after being spawned
    gateway_levels: tuple[int, ...]
    gateway_workers: int
    client_processes: int
    tuning_batches: tuple[int, ...]
    variants: tuple[str, ...]
    photo_crops: tuple[float, ...]
    photo_flips: bool
    photo_limit: int  # photos used by the tuning and accuracy checks
    #: The largest batch the exporter checks each trace against eager at (None: its default,
    #: the largest Triton sends; the dry run's 2 saves it a minute on two CPU cores).
    export_check_batch: int | None = None
    budgets: dict[str, float] = field(default_factory=dict)
    deadline: float = 400.0

    def __post_init__(self) -> None:
        """A plan names networks the contract does not know only by mistake (a rename
        there), and would then fail minutes into a GPU run; it fails here instead."""
        unknown = [n for n in self.networks if n not in NETWORKS]
        if unknown:
            raise ValueError(f"{', '.join(unknown)} not in NETWORKS (inception/contract.py)")
        for role in ("tuned", "gateway_model"):
            if getattr(self, role) not in self.networks:
                raise ValueError(f"the plan's {role} {getattr(self, role)!r} is not among its networks")


BUDGETS = {
    "install": 45,
    "environment": 30,
    "export": 90,
    "triton": 150,
    "accuracy": 30,
    "side_by_side": 70,
    "gateway": 80,
    "tuning": 70,
    "winner": 70,
}


def gpu_plan() -> Plan:
    cores = os.cpu_count() or 16
    return Plan(
        device="cuda",
        config_name="gpu",
        networks=NETWORKS,
        tuned="inception_v4",
        gateway_model="inception_resnet_v1",
        batches=(1, 8, 32, 64),
        fill=128,
        load_seconds=1.5,
        load_warmup=0.5,
        inprocess_seconds=1.0,
        warmup_calls=3,
        blocks=3,
        start_delay=1.0,
        gateway_levels=(16, 64, 256),
        gateway_workers=cores,
        client_processes=max(2, cores // 4),
        tuning_batches=(1, 64, 128),
        variants=(),  # all of tuning.VARIANTS
        photo_crops=(0.875, 1.0, 0.7),
        photo_flips=True,
        photo_limit=100,
        budgets=dict(BUDGETS),
    )


def cpu_dry_run_plan() -> Plan:
    return replace(
        gpu_plan(),
        device="cpu",
        config_name="cpu",
        networks=("inception_resnet_v1",),
        tuned="inception_resnet_v1",
        batches=(1, 2),
        fill=2,
        load_seconds=1.0,
        load_warmup=0.4,
        inprocess_seconds=0.3,
        warmup_calls=1,
        blocks=1,
        start_delay=1.0,
        gateway_levels=(2,),
        gateway_workers=1,
        client_processes=1,
        tuning_batches=(1, 2),
        variants=("dry",),
        photo_crops=(0.875,),
        photo_flips=False,
        photo_limit=4,
        export_check_batch=2,
        deadline=240.0,
    )
