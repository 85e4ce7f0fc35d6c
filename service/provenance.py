"""Which weights serve an answer: the provenance fields every classify answer carries
(``weights``, ``weights_sha256``, ``members``, ``random_init``, ``warning``), read from the
model configs of the moment, so that a client sees a rollout and is warned of weights that
carry no meaning."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

from inception.contract import PRETRAINED_PREFIX, RANDOM_INIT

from .model_config import ModelInfo
from .routing import Plan
from .schemas import Member
from .triton import TritonBackend


def combined_provenance(infos: list[ModelInfo]) -> str:
    """One string for a per-request ensemble: its members' common provenance, or each
    source joined, or `random-init` if any member is (the conservative reading)."""
    kinds = {i.provenance for i in infos}
    if len(kinds) == 1:
        return kinds.pop()
    if any(i.random_init for i in infos):
        return RANDOM_INIT
    return "+".join(sorted(kinds))


def provenance_warning(involved: list[ModelInfo]) -> str | None:
    random = [i.name for i in involved if i.random_init]
    if random:
        return f"randomly initialised weights ({', '.join(random)}): the predictions carry no meaning"
    # A config that no export wrote (Triton started without --model-config-name).
    unknown = [i.name for i in involved if not i.provenance.startswith(PRETRAINED_PREFIX)]
    if unknown:
        return f"weights of unknown provenance ({', '.join(unknown)}): served from an unexported config"
    return None


@dataclass(frozen=True)
class Served:
    """What serves a request, whatever its images: the answer's provenance fields, and the
    networks whose weights compute it (the cache keys on their sha256)."""

    members: list[Member] | None
    involved: list[ModelInfo]
    provenance: str
    weights_sha256: str | None = None


def weights_digest(networks: list[ModelInfo]) -> str | None:
    """The answer's ``weights_sha256``: one network's own checkpoint sha256; for several
    (an ensemble), the sha256 of their ``name:sha256`` lines in name order, so that a client
    sees any member's rollout; None when a network's config records no sha256."""
    if not networks or not all(i.checkpoint_sha256 for i in networks):
        return None
    if len(networks) == 1:
        return networks[0].checkpoint_sha256
    lines = "".join(f"{i.name}:{i.checkpoint_sha256}\n" for i in sorted(networks, key=lambda i: i.name))
    return hashlib.sha256(lines.encode()).hexdigest()


async def served_by(backend: TritonBackend, plan: Plan, infos: list[ModelInfo]) -> Served:
    """Which weights serve the plan: a per-request ensemble's members, or the model and,
    for the Triton ensemble, its members (the conservative reading of provenance)."""
    if plan.custom:
        own = [
            Member(model=i.name, weight=w, weights=i.provenance, weights_sha256=i.checkpoint_sha256 or None)
            for i, w in zip(infos, plan.coefficients, strict=True)
        ]
        return Served(own, infos, combined_provenance(infos), weights_digest(infos))
    info = infos[0]
    members: list[Member] | None = None
    involved = [info]
    if info.is_ensemble:
        member_infos = list(await asyncio.gather(*(backend.model(m) for m in info.members)))
        members = [
            Member(model=m.name, weight=w, weights=m.provenance, weights_sha256=m.checkpoint_sha256 or None)
            for m, w in zip(member_infos, info.member_weights, strict=True)
        ]
        involved = [info, *member_infos]
    random = any(i.random_init for i in involved)
    networks = [i for i in involved if not i.is_ensemble]
    return Served(members, involved, RANDOM_INIT if random else info.provenance, weights_digest(networks))
