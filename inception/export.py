"""`python -m inception.export`: build, trace, freeze, verify and write the Triton repository.

For each network: build it with its weights, wrap it with the in-graph preprocessing and
softmax, trace it, freeze it, check it against eager at batch 1 and at the largest batch
served, and write it as the model's next version, `<name>/<N+1>/model.pt`, staged outside
Triton's view and checked once more as a file (its bytes, and a forward pass of the file
loaded again); then the ensemble's weighted mean; then each model's whole folder, configs
and versions together, is swapped in for the served one (`rollout.py`), under a lock that
a second exporter waits for. With `--triton-url`, the export then waits until that Triton
serves what it published, and fails if it does not. A fingerprint of everything that
determines a model file (source code, weights, precision, torch version, batch size) is
kept beside it, so a re-run with unchanged inputs skips the work and changes nothing; a
rollback (`python -m inception.rollback`) holds until the inputs change again. The source
code of a network is found, not listed: the file that defines its spec's builder, the
exporter's own, and every module of this package either of them imports
(`network_sources`), so a new network's file can never be left out, and editing one
network re-exports only that one.

Freezing inlines the weights as constants and folds each batch norm into its convolution:
on two CPU cores that made a forward pass 1.04–1.06× faster at batch 1 and 1.02–1.22× at
batch 8, with outputs equal to the unfrozen trace within 1e-9 (`bench/README.md`). One frozen file serves the
CPU and the GPU alike: TorchScript maps its constants to the device it is loaded on.
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import importlib.util
import inspect
import io
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import create_model, get_spec, list_models
from .contract import IMAGE_SIZE, MODEL_FILE, NUM_CLASSES, PRECISIONS, RANDOM_INIT
from .registry import MODELS, ModelSpec
from .repository import (
    MAX_BATCH_SIZE,
    EnsembleEntry,
    Export,
    NetworkEntry,
    repository_files,
)
from .rollout import (
    ROLLED_BACK_FROM,
    STAMP,
    Rollout,
    RolloutError,
    file_sha256,
    read_stamp,
    served_version,
    stamp_export,
    write_durably,
)
from .serving import ServingModel, WeightedMean
from .weights import (
    RANDOM_SEED,
    CheckpointError,
    WeightsInfo,
    hub_checkpoint,
    hub_endpoint,
    hub_mode,
    hub_reachable,
    sha256_of,
)

TRACE_TOLERANCE = 1e-5
# fp16 is checked against fp32 eager for gross breakage (overflow, a lost cast), not parity.
FP16_TOLERANCE = 1e-2
_PACKAGE = Path(__file__).parent.name

Log = Callable[[str], None]


@contextmanager
def quiet_torchscript() -> Iterator[None]:
    """TorchScript is deprecated in favour of torch.export, but Triton's libtorch backend
    loads TorchScript: silence that one warning here, not globally."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(TorchScript|torch\.jit).*deprecated")
        yield


def _module_file(name: str) -> Path | None:
    """The source file of module `name`, or None where `name` is not a module of ours (an
    attribute imported with `from . import create_model`, say)."""
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a parent that is not a package
        return None
    return Path(found.origin).resolve() if found is not None and found.origin else None


def package_imports(module: str, path: Path) -> set[str]:
    """The modules of this package that `module` (the file `path`) imports anywhere in its
    body, lazily in a function included: read from its syntax, since an import that only a
    call runs is as much a part of what an export builds."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = importlib.util.resolve_name("." * node.level + base, package)
            # `from . import x` may import the submodule x.
            names.update([base, *(f"{base}.{alias.name}" for alias in node.names)])
    return {n for n in names if n == _PACKAGE or n.startswith(_PACKAGE + ".")}


def _closure(roots: Iterable[tuple[str, Path]], leave_out: set[Path]) -> dict[str, Path]:
    """The roots and every module of this package they import, transitively, except the
    files in `leave_out` (the other networks, which the registry imports), by module name."""
    found: dict[str, Path] = {}
    pending = list(roots)
    while pending:
        module, path = pending.pop()
        if module in found or path in leave_out:
            continue
        found[module] = path
        for name in package_imports(module, path):
            file = _module_file(name)
            if file is not None and file.suffix == ".py":
                pending.append((name, file))
    return dict(sorted(found.items()))


def _builder_file(spec: ModelSpec) -> Path:
    path = inspect.getsourcefile(spec.builder)
    if path is None:
        raise ValueError(f"{spec.name}: the source of {spec.builder!r} cannot be found to fingerprint it")
    return Path(path).resolve()


def network_sources(spec: ModelSpec | None) -> dict[str, Path]:
    """The source files that shape `spec`'s exported file, by module name: its builder's
    module, this exporter, and what they import of this package (the layers, the registry,
    weight loading, the serving wrapper, the contract, the writer), but not the other
    networks. With `spec` None, what shapes every file: the ensemble's mean has only that."""
    exporter = (__spec__.name if __spec__ else f"{_PACKAGE}.export", Path(__file__).resolve())
    roots = [exporter] if spec is None else [(spec.builder.__module__, _builder_file(spec)), exporter]
    others = {_builder_file(s) for s in MODELS.values() if s is not spec}
    return _closure(roots, others)


def source_digest(spec: ModelSpec | None = None) -> str:
    """sha256 over `network_sources(spec)`, each file under its module name."""
    digest = hashlib.sha256()
    for module, path in network_sources(spec).items():
        digest.update(f"{module}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _fingerprint(**parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class ExportCheckFailed(RuntimeError):
    """A model file that, read back, is not the module that was traced."""


def write_version(
    module: torch.jit.ScriptModule,
    version_dir: Path,
    stamp: dict[str, object],
    check_inputs: tuple[torch.Tensor, ...] | None = None,
) -> None:
    """`module` saved as `version_dir`'s model file, with its stamp, and read back: the
    bytes on disk must be the bytes saved (their SHA-256, recorded in the stamp, is what
    the rollout checks again before Triton may see them), and the file loaded again must
    answer `check_inputs` as the module does. `version_dir` is a new folder of a staged
    generation, never one Triton serves."""
    buffer = io.BytesIO()
    with quiet_torchscript():
        torch.jit.save(module, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = version_dir / MODEL_FILE
    write_durably(path, data)
    if file_sha256(path) != digest:
        raise ExportCheckFailed(f"{path} does not read back as written (a full or failing disk?)")
    if check_inputs is not None:
        with quiet_torchscript(), torch.no_grad():
            loaded = torch.jit.load(str(path)).eval()
            got = loaded(*check_inputs)
            err = max_error(module(*check_inputs), got)
        if err > TRACE_TOLERANCE:
            raise ExportCheckFailed(f"{path} loaded again answers unlike the traced module (by {err:.3g})")
        # What every config states: Triton's warm-up refuses anything else (which, retried at
        # every poll, crashed the embedded tritonserver: docs/architecture.md).
        wanted = (check_inputs[0].shape[0], NUM_CLASSES)
        if got.dtype != torch.float32 or tuple(got.shape) != wanted:
            raise ExportCheckFailed(
                f"{path} answers {got.dtype} {tuple(got.shape)}, not the float32 {wanted} its config states"
            )
    record = {**stamp, "model_sha256": digest}
    write_durably(version_dir / STAMP, (json.dumps(record, indent=2) + "\n").encode())


def example_images(batch: int, size: int = IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen)


def max_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    diff = (expected.float() - got.float()).abs()
    return float("inf") if not bool(torch.isfinite(got).all()) else float(diff.max())


def trace_and_check(
    module: torch.nn.Module,
    examples: Sequence[tuple[torch.Tensor, ...]],
    precision: str = "fp32",
) -> torch.jit.ScriptModule:
    """Traces on the first example, converts to `precision`, freezes, and requires the
    result to equal eager fp32 on every example (within FP16_TOLERANCE for fp16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    module.eval()
    tolerance = TRACE_TOLERANCE if precision == "fp32" else FP16_TOLERANCE
    with torch.inference_mode(False), torch.no_grad(), quiet_torchscript():
        # A trace shares its tensors with the module: convert a copy, keep eager in fp32.
        source = copy.deepcopy(module) if precision == "fp16" else module
        traced = torch.jit.trace(source, examples[0], check_trace=False)
        if precision == "fp16":
            traced = traced.half()
        frozen = torch.jit.freeze(traced.eval())
        for example in examples:
            err = max_error(module(*example), frozen(*example))
            if err > tolerance:
                raise RuntimeError(
                    f"the frozen {precision} trace differs from eager by {err:.3g} "
                    f"at batch {example[0].shape[0]}"
                )
    return frozen


@dataclass(frozen=True)
class WeightsChoice:
    """One network's weights for this export, and why they are random when they are."""

    weights: str | None  # create_model's argument; None: the deterministic random init
    identity: str  # what the fingerprint records of them
    why_random: str = ""


class WeightsRequired(ValueError):
    """Networks would serve random weights that nobody allowed (`--allow-random`)."""


def resolve_weights(name: str, checkpoints: dict[str, str], hub: str, hub_up: bool) -> WeightsChoice:
    """A given checkpoint; else timm's published one when the hub is used (`hub` is
    `never`, `auto` or `always`; `hub_up`: whether it answered); else random, with why.
    With `always` a failed download is an error; with `auto` it falls back to random."""
    if name in checkpoints:
        path = Path(checkpoints[name]).expanduser().resolve()
        return WeightsChoice(str(path), sha256_of(path) if path.is_file() else str(path))
    random_id = f"{RANDOM_INIT}:{RANDOM_SEED}"
    spec = get_spec(name)
    if not spec.has_public_checkpoint:
        return WeightsChoice(None, random_id, "no checkpoint was given and none is published")
    if hub == "never":
        return WeightsChoice(None, random_id, "no checkpoint was given and the hub is not used")
    if hub == "auto" and not hub_up:
        return WeightsChoice(
            None, random_id, f"no checkpoint was given and the hub ({hub_endpoint()}) did not answer"
        )
    try:
        path = hub_checkpoint(spec)
    except Exception as exc:  # network, HTTP or cache errors of huggingface_hub, all alike
        if hub == "always":
            raise CheckpointError(f"{name}: cannot download {spec.hub_repo} from the hub: {exc}") from exc
        return WeightsChoice(
            None, random_id, f"the download of {spec.hub_repo} failed ({type(exc).__name__})"
        )
    return WeightsChoice(str(path), sha256_of(path))


def served_stamp(root: Path, name: str) -> dict[str, object] | None:
    """The stamp of the version of `name` that Triton serves from `root`, or None."""
    number = served_version(root / name)
    return None if number is None else read_stamp(root / name / str(number))


def pretrained_export(root: Path, name: str) -> str | None:
    """The provenance of an existing pretrained export of `name`, or None."""
    stamp = served_stamp(root, name)
    weights = (stamp or {}).get("weights")
    return weights if isinstance(weights, str) and weights.startswith("pretrained:") else None


def _parse_allow_random(value: str, names: Sequence[str]) -> set[str]:
    """`all`, `none` (or empty), or comma-separated network names."""
    value = value.strip().lower()
    if value == "all":
        return set(names)
    if value in ("", "none"):
        return set()
    allowed = {n.strip() for n in value.split(",") if n.strip()}
    for name in allowed:
        get_spec(name)  # an unknown name is a KeyError that lists the known ones
    return allowed


def network_entry(spec: ModelSpec, export: Export | None = None) -> NetworkEntry:
    """The network as the repository writer describes it: its preprocessing (and so its
    input's dims) from its spec, its provenance from an export."""
    return NetworkEntry(
        name=spec.name,
        crop_pct=spec.crop_pct,
        interpolation=spec.interpolation,
        input_size=spec.input_size,
        export=export,
    )


def network_fingerprint(name: str, choice: WeightsChoice, precision: str) -> str:
    """What determines `name`'s exported file: equal fingerprints, equal files."""
    return _fingerprint(
        model=name,
        weights=choice.identity,
        precision=precision,
        source=source_digest(get_spec(name)),
        torch=torch.__version__,
        batch=MAX_BATCH_SIZE,
    )


def _rolled_back_from(stamp: dict[str, object]) -> str | None:
    """The fingerprint of the export that a rollback took out of service, if `stamp` is a
    rollback's."""
    back = stamp.get(ROLLED_BACK_FROM)
    fingerprint = back.get("fingerprint") if isinstance(back, dict) else None
    return fingerprint if isinstance(fingerprint, str) else None


def export_network(
    name: str,
    rollout: Rollout,
    choice: WeightsChoice,
    precision: str,
    log: Log,
    keep_pretrained: bool = False,
    check_batch: int = MAX_BATCH_SIZE,
) -> NetworkEntry:
    """Exports one network as a staged new version where its inputs changed; with
    `keep_pretrained`, random weights never replace an existing pretrained export (a failed
    download keeps what was served before); the inputs a rollback took out of service are
    not exported again (the rollback holds until the inputs change). The trace is checked
    against eager at batch 1 and `check_batch` (fp32; fp16 at 1 and 2)."""
    spec = get_spec(name)
    weights = choice.weights
    fingerprint = network_fingerprint(name, choice, precision)
    stamp = rollout.served_stamp(name)
    kept = pretrained_export(rollout.root, name) if weights is None and keep_pretrained else None
    if kept is not None and stamp is not None:
        log(
            f"{name}: kept the existing export ({kept}): {choice.why_random}, "
            "and random weights never replace pretrained ones"
        )
    elif stamp is not None and stamp.get("fingerprint") == fingerprint:
        log(f"{name}: up to date ({stamp['weights']}), skipped")
    elif stamp is not None and _rolled_back_from(stamp) == fingerprint:
        log(
            f"{name}: kept the rollback to {stamp['weights']}: these inputs are the ones it took out "
            f"of service; run the rollback again to serve them, or change the inputs"
        )
    else:
        start = time.monotonic()
        log(f"{name}: building ({'random init' if weights is None else weights})")
        model = create_model(name, weights)
        info = model.weights_info
        assert isinstance(info, WeightsInfo)  # set by create_model, unknown to nn.Module's typing
        # fp16 runs slowly on a CPU: check it at small batches only.
        batches = (1, check_batch) if precision == "fp32" else (1, min(2, check_batch))
        log(f"{name}: tracing, freezing ({precision}) and checking against eager at batch {batches}")
        examples = [(example_images(b, spec.input_size, seed=i),) for i, b in enumerate(batches)]
        traced = trace_and_check(ServingModel(model), examples, precision)
        stamp = {
            "fingerprint": fingerprint,
            "weights": info.provenance,
            "weights_sha256": info.sha256,
            "precision": precision,
        }
        version_dir = rollout.new_version(name)
        # What the fingerprint read, to tell why an export ran again.
        write_version(traced, version_dir, {**stamp, "sources": list(network_sources(spec))}, examples[0])
        size_mb = (version_dir / MODEL_FILE).stat().st_size / 1e6
        log(
            f"{name}: wrote version {version_dir.name} ({size_mb:.0f} MB) in "
            f"{time.monotonic() - start:.0f} s, staged until the repository is published"
        )
    return network_entry(spec, stamp_export(stamp))


def export_mean(ensemble: EnsembleEntry, rollout: Rollout, log: Log) -> None:
    """The ensemble's weighted mean as a staged new version where its weights changed."""
    n = len(ensemble.members)
    fingerprint = _fingerprint(
        weights=list(ensemble.member_weights), source=source_digest(None), torch=torch.__version__
    )
    stamp = rollout.served_stamp(ensemble.mean_name)
    if stamp is not None and stamp.get("fingerprint") == fingerprint:
        log(f"{ensemble.mean_name}: up to date, skipped")
        return
    gen = torch.Generator().manual_seed(0)
    examples = [
        tuple(torch.rand(b, NUM_CLASSES, generator=gen) for _ in range(n)) for b in (1, MAX_BATCH_SIZE)
    ]
    traced = trace_and_check(WeightedMean(list(ensemble.member_weights)), examples)
    write_version(
        traced,
        rollout.new_version(ensemble.mean_name),
        {"fingerprint": fingerprint, "weights": "none", "weights_sha256": "", "precision": "fp32"},
        examples[0],
    )
    log(f"{ensemble.mean_name}: wrote the weighted mean of {', '.join(m.name for m in ensemble.members)}")


def ensemble_entry(
    networks: Sequence[NetworkEntry],
    member_names: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
) -> EnsembleEntry:
    """The ensemble of `member_names` (default: every network exported, in order) with
    `weights` normalised to sum to one (default: equal)."""
    member_names = list(member_names or [n.name for n in networks])
    by_name = {n.name: n for n in networks}
    unknown = [m for m in member_names if m not in by_name]
    if unknown:
        raise ValueError(f"ensemble members {unknown} are not among the exported models {list(by_name)}")
    weights = list(weights or [1.0] * len(member_names))
    if len(weights) != len(member_names):
        raise ValueError(f"{len(member_names)} ensemble members but {len(weights)} weights")
    total = sum(weights)
    return EnsembleEntry(
        members=tuple(by_name[m] for m in member_names),
        member_weights=tuple(round(w / total, 6) for w in weights),
    )


def _parse_checkpoints(items: Sequence[str]) -> dict[str, str]:
    checkpoints = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise SystemExit(f"--checkpoint takes NAME=PATH, got {item!r}")
        get_spec(name)
        checkpoints[name] = path
    return checkpoints


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inception.export", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="precision the networks run in (input stays uint8, output float32); fp16 is for GPUs",
    )
    parser.add_argument(
        "--models", default=",".join(list_models()), help="comma-separated networks to export"
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a timm checkpoint (.safetensors/.pth) or our own state dict for NAME",
    )
    parser.add_argument(
        "--hub",
        nargs="?",
        const="always",
        default="never",
        help="timm's published checkpoints, where no --checkpoint is given: never (default), "
        "auto (when the hub answers a short check; random otherwise, with a message), "
        "always (a failed download is an error); a bare --hub means always",
    )
    parser.add_argument(
        "--hub-timeout", type=float, default=3.0, help="seconds the auto check waits for the hub"
    )
    parser.add_argument(
        "--never-replace-pretrained",
        action="store_true",
        help="keep a pretrained export even where this run asks for no real weights "
        "(the deployment images pass it; by default only a failed source keeps it)",
    )
    parser.add_argument(
        "--allow-random",
        default="all",
        metavar="all|none|NAME,...",
        help="networks that may serve random weights when no real ones can be had (default all; "
        "the deployment images pass none unless MODELS_ALLOW_RANDOM says otherwise); any other "
        "network without real weights fails the export",
    )
    parser.add_argument(
        "--ensemble-members", default=None, help="comma-separated; default: every exported network"
    )
    parser.add_argument(
        "--ensemble-weights", default=None, help="comma-separated, same order; default: equal"
    )
    parser.add_argument("--no-ensemble", action="store_true")
    parser.add_argument(
        "--check-batch",
        type=int,
        default=MAX_BATCH_SIZE,
        help=f"the largest batch each trace is checked against eager at (default {MAX_BATCH_SIZE}, "
        "the most Triton sends it; the check costs a minute a network on two CPU cores, so tests "
        "of what surrounds an export pass a small one)",
    )
    parser.add_argument(
        "--triton-url",
        default=None,
        metavar="HOST:PORT",
        help="Triton's HTTP address: once published, wait until it serves every model as "
        "published (version and provenance) and fail if it does not; where no Triton answers "
        "(it has not started yet), say so and finish",
    )
    parser.add_argument(
        "--triton-timeout", type=float, default=600.0, help="seconds --triton-url waits (default 600)"
    )
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[export] {message}", flush=True)

    try:
        names = [n for n in args.models.split(",") if n]
        for name in names:
            get_spec(name)
        if not 1 <= args.check_batch <= MAX_BATCH_SIZE:
            raise ValueError(f"--check-batch must be within 1 and {MAX_BATCH_SIZE}, got {args.check_batch}")
        checkpoints = _parse_checkpoints(args.checkpoint)
        hub = hub_mode(args.hub)
        allowed = _parse_allow_random(args.allow_random, names)
        # One writer at a time, from the first look at what is served to the last swap (and
        # the wait for Triton): a second exporter waits, then finds this one's work.
        with Rollout(args.repository, log) as rollout:
            choices = _choose_weights(args, names, checkpoints, hub, allowed, log)
            keep_pretrained = _keep_pretrained(args, hub)
            networks = []
            for i, name in enumerate(names, 1):
                log(f"({i}/{len(names)}) {name}")
                networks.append(
                    export_network(
                        name, rollout, choices[name], args.precision, log, keep_pretrained, args.check_batch
                    )
                )
            ensemble = None
            if not args.no_ensemble:
                ensemble = ensemble_entry(
                    networks,
                    args.ensemble_members.split(",") if args.ensemble_members else None,
                    [float(w) for w in args.ensemble_weights.split(",")] if args.ensemble_weights else None,
                )
                export_mean(ensemble, rollout, log)
            changed = rollout.publish_all(repository_files(networks, ensemble))
            log(f"wrote the repository at {args.repository} ({len(changed)} models changed)")
            for entry in networks:
                if entry.export is not None and entry.export.provenance == RANDOM_INIT:
                    why = choices[entry.name].why_random or "so it was exported before"
                    log(f"WARNING: {entry.name} serves random weights ({why}): its answers carry no meaning")
            if args.triton_url:
                rollout.wait_or_roll_back(args.triton_url, args.triton_timeout)
    except (CheckpointError, KeyError, ValueError) as exc:
        print(f"[export] error: {exc}", file=sys.stderr)
        return 2
    except (RolloutError, ExportCheckFailed) as exc:
        print(f"[export] error: {exc}", file=sys.stderr)
        return 3
    return 0


def _keep_pretrained(args: argparse.Namespace, hub: str) -> bool:
    """Random weights replace pretrained ones only when the run asked for no real weights,
    and never in a deployment."""
    return hub != "never" or bool(args.never_replace_pretrained)


def _choose_weights(
    args: argparse.Namespace,
    names: Sequence[str],
    checkpoints: dict[str, str],
    hub: str,
    allowed: set[str],
    log: Log,
) -> dict[str, WeightsChoice]:
    """Each network's weights, refused where they would be random and nobody allowed it."""
    from_hub = [n for n in names if n not in checkpoints and get_spec(n).has_public_checkpoint]
    hub_up = hub == "always" or (hub == "auto" and bool(from_hub) and hub_reachable(timeout=args.hub_timeout))
    if hub == "auto" and from_hub:
        state = "answered" if hub_up else f"did not answer within {args.hub_timeout:g} s"
        log(f"the hub ({hub_endpoint()}) {state}: {', '.join(from_hub)} have published weights")
    keep_pretrained = _keep_pretrained(args, hub)

    def refuse(choices: dict[str, WeightsChoice]) -> None:
        refused = [
            name
            for name, choice in choices.items()
            if choice.weights is None
            and name not in allowed
            and not (keep_pretrained and pretrained_export(args.repository, name))
        ]
        if refused:
            reasons = "; ".join(f"{n}: {choices[n].why_random}" for n in refused)
            raise WeightsRequired(
                f"no real weights for {', '.join(refused)} ({reasons}). Give a checkpoint "
                "(--checkpoint NAME=PATH; in the deployment images <checkpoint dir>/NAME.safetensors), "
                "let the hub be reached (--hub always), or allow random weights explicitly "
                f"(--allow-random {','.join(refused)}; MODELS_ALLOW_RANDOM in the deployment images)"
            )

    # What needs no download is decided and checked first, so that a refusal comes before
    # minutes of downloading; then the downloads, whose failures are checked again.
    downloads = [n for n in names if n in from_hub and hub_up]
    choices = {n: resolve_weights(n, checkpoints, hub, hub_up) for n in names if n not in downloads}
    refuse(choices)
    choices |= {n: resolve_weights(n, checkpoints, hub, hub_up) for n in downloads}
    refuse({n: choices[n] for n in downloads})
    return choices


if __name__ == "__main__":
    sys.exit(main())
