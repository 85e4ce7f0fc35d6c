"""Rolling a Triton model repository forward, and back, while Triton polls it.

Triton in poll mode (compose runs it so) reloads a model whose folder changed with whatever
it finds there at that poll: a model file written in place can be read half-written, and a
model file and its config written one after the other can be read with one new and the
other old (new weights served under the old provenance). So nothing here writes into a
model folder that Triton may read. Each change builds the model's whole folder anew (a
"generation": the committed config, both config variants, the labels, the new version
folder and a copy of the version before it) in a staging area beside the repository,
checks it (every model file is the one its export wrote, byte for byte, and the configs
state the provenance of the version they will serve), and then swaps it for the served
folder in one step (`renameat2` with `RENAME_EXCHANGE`): Triton reads the old generation
or the new one, never a mix, and a generation that fails its checks never reaches it.

Facts of tritonserver 2.51 this rests on (checked with the embedded server: the note in
docs/architecture.md, "Rolling out weights", says how):

- Every folder in the repository root is a model, hidden ones too: a staging folder
  there fails to load, and with `--exit-on-error` stops Triton at start. The staging
  area and the lock therefore live beside the root (`<parent>/.<root name>.rollout/`), on
  the same file system, which the swap needs.
- Folders in a model folder whose names are not numbers are ignored (a warning).
- A changed model is loaded beside the serving one, which answers until the new one is
  ready; when the new version fails to load, the old one keeps serving (and its config
  with it), and Triton tries again at every poll.
- With `version_policy: latest 1` and versions N-1 and N present, Triton loads N and
  unloads N-1 once N is ready; a folder swapped for another is seen as modified (its
  files are newer), whether it is a directory or a link to one.
- A file's modification time, to Triton, is the later of its mtime and its ctime, and a
  new hard link to a file (or the removal of one) changes its ctime: linking a served
  file into a new generation made Triton reload that unchanged model at its next poll.
  So the kept version is copied, never linked, and no writer touches a served inode.

Version numbers only grow: a new export is N+1, and a rollback publishes the previous
version's file again as N+1 (a copy), so that a number always names the same bytes, and a
load that Triton began from one generation finds the same file in the next. Each folder
keeps the served version and the one before it (`KEEP_VERSIONS`).

One writer at a time: every writer (the exporter, a rollback) holds an exclusive lock on
a file in the staging area for its whole run, so two exports cannot interleave and the
second sees what the first published.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from google.protobuf import text_format

from .contract import (
    MODEL_FILE,
    PARAM_MEMBERS,
    PARAM_PRECISION,
    PARAM_WEIGHTS,
    PARAM_WEIGHTS_SHA256,
    VARIANTS,
)
from .repository import (
    EnsembleEntry,
    Export,
    NetworkEntry,
    ensemble_export,
    parse,
    render,
    repository_files,
    stated_export,
    with_export,
)

STAMP = ".export.json"
#: The served version and the one before it, for a rollback.
KEEP_VERSIONS = 2
STORE_SUFFIX = ".rollout"
LOCK_FILE = "lock"
STAGING = "staging"
#: What a rollback records in the stamp of the version it publishes.
ROLLED_BACK_FROM = "rolled_back_from"
ENSEMBLE_PLATFORM = "ensemble"

Log = Callable[[str], None]


class RolloutError(RuntimeError):
    """A change refused before it reached Triton, or one that Triton did not take."""


class NotServed(RolloutError):
    """Triton answers but does not serve what was published: `pending` says what it lacks,
    `state` what it serves instead."""

    def __init__(self, message: str, pending: Sequence[Expected], state: str) -> None:
        super().__init__(message)
        self.pending = list(pending)
        self.state = state


def _default_log(message: str) -> None:
    print(f"[rollout] {message}", flush=True)


# ------------------------------------------------------------------------------ layout


def store_of(repository: Path) -> Path:
    """The lock and staging area of `repository`: beside it (Triton takes every folder in
    the root for a model), on the same file system (a swap is a rename)."""
    root = Path(os.path.abspath(repository))
    return root.parent / f".{root.name}{STORE_SUFFIX}"


def versions(folder: Path) -> list[int]:
    """The version folders of a model folder, ascending, named as Triton reads them:
    digits without a leading zero. Anything else (`configs/`) Triton ignores."""
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if name.isascii() and name.isdigit() and (name == "0" or name[0] != "0") and entry.is_dir():
            found.append(int(name))
    return sorted(found)


def served_version(folder: Path) -> int | None:
    """The version Triton serves under `version_policy: latest 1`: the highest."""
    numbers = versions(folder)
    return numbers[-1] if numbers else None


def served_model_file(repository: Path, name: str) -> Path:
    """The model file Triton serves of `name`: for the tests and benches that read it."""
    folder = Path(repository) / name
    number = served_version(folder)
    if number is None:
        raise FileNotFoundError(f"{folder} has no version folder: run `make repository`")
    return folder / str(number) / MODEL_FILE


def read_stamp(version_dir: Path) -> dict[str, Any] | None:
    """The export's record beside a model file, or None where either is missing."""
    stamp = version_dir / STAMP
    if not (version_dir / MODEL_FILE).is_file() or not stamp.is_file():
        return None
    try:
        value = json.loads(stamp.read_text())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def stamp_export(stamp: Mapping[str, Any]) -> Export:
    """The provenance a stamp records, as the configs state it."""
    return Export(
        str(stamp["weights"]), str(stamp.get("weights_sha256", "")), str(stamp.get("precision", "fp32"))
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_durably(path: Path, data: bytes) -> None:
    """A new file, on disk before it is published: a swap that survives a power cut must
    not point at a file whose blocks never reached the disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(path: Path) -> None:
    """The folders of a generation on disk (their files were written durably), before the
    swap makes them what Triton reads."""
    for folder in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        _fsync_dir(folder)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(first: Path, second: Path) -> None:
    """Swaps two paths in one step (Linux's renameat2 with RENAME_EXCHANGE): a reader of
    either path finds one folder or the other, never neither and never a mix."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise RolloutError("this C library has no renameat2: the repository cannot be swapped in one step")
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise RolloutError(
            f"cannot swap {second} for its new generation in one step ({os.strerror(code)}): "
            f"the repository and {first.parent} must be on one local file system that swaps "
            "folders atomically (ext4, xfs, btrfs, tmpfs)"
        )


# ------------------------------------------------------------------------------ the lock


@contextlib.contextmanager
def exclusive(store: Path, log: Log = _default_log) -> Iterator[None]:
    """The repository's one writer: an exclusive lock on `<store>/lock` for as long as the
    block runs (the kernel drops it when the process dies, however it dies). A second
    writer says whom it waits for, then waits."""
    store.mkdir(parents=True, exist_ok=True)
    with open(store / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a writer that did not say who it is"
            log(f"waiting for the repository's other writer to finish ({holder})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.truncate(0)
        since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------ waiting


@dataclass(frozen=True)
class Expected:
    """What Triton must serve of one model once it has loaded what was published: the
    version, and the config parameters that state its provenance."""

    name: str
    version: int
    parameters: Mapping[str, str] = field(default_factory=dict)
    #: The other versions the folder holds (the one before), to say which Triton serves.
    others: tuple[int, ...] = ()

    def describe(self) -> str:
        sha = self.parameters.get(PARAM_WEIGHTS_SHA256, "")
        weights = self.parameters.get(PARAM_WEIGHTS)
        facts = [f"version {self.version}"]
        if weights:
            facts.append(weights)
        if sha:
            facts.append(f"weights_sha256 {sha[:12]}…")
        return f"{self.name} ({', '.join(facts)})"


#: Triton is asked directly, never through a proxy: the models job may be given one
#: (HTTPS_PROXY) for the hub, and it would not know Triton's address on the compose network.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get_json(url: str, timeout: float) -> Any:
    with _DIRECT.open(url, timeout=timeout) as answer:
        return json.loads(answer.read() or b"null")


def _answers_200(url: str, timeout: float) -> bool:
    try:
        with _DIRECT.open(url, timeout=timeout) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def served_parameters(base: str, name: str, timeout: float = 5.0) -> dict[str, str]:
    """The string parameters of the config Triton serves for `name` (empty if none)."""
    try:
        config = _get_json(f"{base}/v2/models/{urllib.parse.quote(name)}/config", timeout)
    except (urllib.error.URLError, OSError, ValueError):
        return {}
    params = (config or {}).get("parameters", {}) if isinstance(config, dict) else {}
    return {k: str(v.get("string_value", "")) for k, v in params.items() if isinstance(v, dict)}


def is_served(base: str, expected: Expected, timeout: float = 5.0) -> bool:
    """Triton has the expected version ready and serves the config that states it."""
    name = urllib.parse.quote(expected.name)
    if not _answers_200(f"{base}/v2/models/{name}/versions/{expected.version}/ready", timeout):
        return False
    served = served_parameters(base, expected.name, timeout)
    return all(served.get(key) == value for key, value in expected.parameters.items())


def _ready_versions(base: str, expected: Expected, timeout: float = 5.0) -> list[str]:
    """Which of the folder's versions Triton has ready, asked one by one (the model's
    metadata did not always answer while Triton was retrying a failed load)."""
    name = urllib.parse.quote(expected.name)
    return [
        str(number)
        for number in sorted({*expected.others, expected.version})
        if _answers_200(f"{base}/v2/models/{name}/versions/{number}/ready", timeout)
    ]


def triton_base(url: str) -> str:
    """Triton's HTTP address as an URL base: `triton:8000` or `http://triton:8000`."""
    return (url if "://" in url else f"http://{url}").rstrip("/")


def wait_until_served(
    url: str, expected: Sequence[Expected], timeout: float, log: Log = _default_log, interval: float = 1.0
) -> bool:
    """Waits until the Triton at `url` (its HTTP port) serves every expectation. False when
    no Triton answers there (the first `docker compose up` runs the export before Triton
    starts, and Triton then loads the repository as it is); raises NotServed when one
    answers but does not serve them all within `timeout` seconds."""
    base = triton_base(url)
    try:
        with _DIRECT.open(f"{base}/v2/health/live", timeout=5) as answer:
            answer.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        log(
            f"no Triton answers at {url} ({reason}): nothing to wait for; "
            "it loads the repository when it starts"
        )
        return False
    log(f"waiting up to {timeout:.0f} s for Triton at {url} to serve {len(expected)} models as published")
    start = time.monotonic()
    pending = list(expected)
    while True:
        pending = [e for e in pending if not is_served(base, e)]
        if not pending:
            log(f"Triton serves what was published ({time.monotonic() - start:.0f} s)")
            return True
        if time.monotonic() - start > timeout:
            lines = []
            for item in pending:
                served = served_parameters(base, item.name)
                ready = ", ".join(_ready_versions(base, item)) or "none of them"
                sha = served.get(PARAM_WEIGHTS_SHA256, "")
                lines.append(
                    f"{item.describe()}: of the versions kept, Triton has {ready} ready"
                    + (f", weights_sha256 {sha[:12]}…" if sha else "")
                )
            names = " ".join(sorted({item.name for item in pending}))
            state = f"Triton at {url} does not serve what was published after {timeout:.0f} s: " + "; ".join(
                lines
            )
            raise NotServed(
                state + ". Triton keeps serving what it had loaded, but its next start loads the "
                "repository as it is and, with --exit-on-error, stops if that fails. Read "
                "Triton's log for why the load failed, then roll back (`docker compose run --rm "
                f"models rollback {names}`, or `make rollback MODEL=...`) or export again.",
                pending,
                state,
            )
        time.sleep(interval)


# ------------------------------------------------------------------------------ rollout


def _is_ensemble(files: Mapping[str, bytes]) -> bool:
    return parse(files["config.pbtxt"].decode()).platform == ENSEMBLE_PLATFORM


def _provenance_parameters(files: Mapping[str, bytes]) -> dict[str, str]:
    """The provenance a model folder's GPU variant states (the CPU one states the same)."""
    config = parse(files[f"configs/{VARIANTS[0]}.pbtxt"].decode())
    keys = (PARAM_WEIGHTS, PARAM_WEIGHTS_SHA256, PARAM_PRECISION)
    return {k: config.parameters[k].string_value for k in keys if k in config.parameters}


class Rollout:
    """One writer's session on a repository: the lock, the staging area, the swaps.

    Used as a context manager: entering takes the lock (waiting for another writer) and
    clears what an interrupted writer left staged; leaving drops what this one staged and
    did not publish, then the lock."""

    def __init__(self, repository: Path, log: Log | None = None) -> None:
        self.root = Path(os.path.abspath(repository))
        self.store = store_of(self.root)
        self.staging = self.store / STAGING
        self.log = log or _default_log
        #: What each model published or left as it was in this session now serves.
        self.expected: dict[str, Expected] = {}
        #: The models this session published a new version of.
        self.new_versions: set[str] = set()
        self._lock = contextlib.ExitStack()

    def __enter__(self) -> Rollout:
        try:
            self.store.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RolloutError(
                f"cannot create the repository's lock and staging area at {self.store} ({exc}): "
                "they sit beside the repository, so its parent must be writable and on its file "
                "system; in the models image, the repository is a folder of the volume "
                "(MODELS_REPOSITORY=/models/repository), not the volume itself"
            ) from exc
        self._lock.enter_context(exclusive(self.store, self.log))
        try:
            self._clear_staging("an interrupted writer left staged")
        except BaseException:
            self._lock.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._clear_staging("not published")
        finally:
            self._lock.close()

    def _clear_staging(self, why: str) -> None:
        if self.staging.exists():
            left = sorted(p.name for p in self.staging.iterdir())
            if left:
                self.log(f"removed {', '.join(left)} from the staging area ({why})")
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)

    # -- reading what is served

    def served_stamp(self, name: str) -> dict[str, Any] | None:
        number = served_version(self.root / name)
        return None if number is None else read_stamp(self.root / name / str(number))

    # -- building a generation

    def new_version(self, name: str) -> Path:
        """An empty version folder for `name`'s next version, in its staged generation:
        the exporter writes the model file there, and `publish` completes the rest."""
        generation = self.staging / name
        if versions(generation):
            raise RolloutError(f"{name}: a new version is staged already")
        number = max([0, *versions(self.root / name)]) + 1
        folder = generation / str(number)
        folder.mkdir(parents=True)
        return folder

    def _unchanged(self, live: Path, files: Mapping[str, bytes], keep: Sequence[int]) -> bool:
        if versions(live) != list(keep):
            return False
        for relative, data in files.items():
            path = live / relative
            if not path.is_file() or path.read_bytes() != data:
                return False
        return True

    def check(self, name: str, generation: Path) -> None:
        """Refuses a generation Triton must not see: a model file that is not, byte for
        byte, the one its export wrote (truncated, or changed since), or configs that state
        another provenance than the version they serve."""
        numbers = versions(generation)
        configs = {}
        for variant in VARIANTS:
            path = generation / "configs" / f"{variant}.pbtxt"
            try:
                configs[variant] = parse(path.read_text())
            except (OSError, text_format.ParseError) as exc:
                raise RolloutError(f"{name}: {path.name} cannot be read as a Triton config: {exc}") from exc
        for number in numbers:
            folder = generation / str(number)
            model = folder / MODEL_FILE
            if not model.exists():
                if configs[VARIANTS[0]].platform == ENSEMBLE_PLATFORM:
                    continue
                raise RolloutError(f"{name}: version {number} has no {MODEL_FILE}")
            recorded = (read_stamp(folder) or {}).get("model_sha256")
            if recorded:
                actual = file_sha256(model)
                if actual != recorded:
                    raise RolloutError(
                        f"{name}: version {number}'s {MODEL_FILE} is not the file its export wrote "
                        f"({model.stat().st_size} bytes, sha256 {actual[:12]}…, recorded {recorded[:12]}…): "
                        "refused; Triton keeps serving what it serves"
                    )
        if not numbers:
            return  # configs alone (a test's repository): Triton loads no model from them
        stamp = read_stamp(generation / str(numbers[-1]))
        if stamp is None or "weights" not in stamp or stamp.get("weights") == "none":
            return  # the ensemble and its mean state no provenance of their own files
        recorded_export = stamp_export(stamp)
        for variant, config in configs.items():
            stated = stated_export(config)
            if stated != recorded_export:
                raise RolloutError(
                    f"{name}: configs/{variant}.pbtxt states {stated} but version {numbers[-1]} "
                    f"holds {recorded_export}: a config and the weights it serves change together"
                )

    def publish(self, name: str, files: Mapping[str, bytes]) -> bool:
        """Makes `name`'s folder hold `files` (paths in the folder: configs and labels),
        the version staged by `new_version` if there is one, and the versions kept (the
        served one before it). Nothing changes where nothing would (Triton's poller sees
        no newer file); otherwise the generation is built, checked and swapped in. True
        when it was."""
        live = self.root / name
        generation = self.staging / name
        staged = versions(generation)
        keep = versions(live)[-(KEEP_VERSIONS - len(staged)) :] if len(staged) < KEEP_VERSIONS else []
        ensemble = _is_ensemble(files)
        if not staged and live.is_dir() and (keep or not ensemble) and self._unchanged(live, files, keep):
            self._record(name, files)
            return False
        generation.mkdir(parents=True, exist_ok=True)
        for relative, data in files.items():
            write_durably(generation / relative, data)
        for number in keep:
            # Copied, not linked: a link would change the served file's ctime, which Triton
            # reads as a change, and it would reload a model nobody changed.
            shutil.copytree(live / str(number), generation / str(number), copy_function=shutil.copy2)
        if ensemble and not versions(generation):
            (generation / "1").mkdir()  # an ensemble loads from an empty version folder
        self.check(name, generation)
        _fsync_tree(generation)
        self.root.mkdir(parents=True, exist_ok=True)
        if live.exists() or live.is_symlink():
            exchange(generation, live)
        else:
            os.rename(generation, live)
        _fsync_dir(self.root)
        if generation.is_symlink():
            generation.unlink()
        elif generation.exists():
            shutil.rmtree(generation)  # the generation that was served until now
        self._record(name, files)
        if staged:
            self.new_versions.add(name)
        numbers = versions(live)
        if not numbers:
            self.log(f"{name}: published its configs (it has no version yet)")
        else:
            kept = f"; version {numbers[-2]} kept for a rollback" if len(numbers) > 1 else ""
            self.log(f"{name}: published version {numbers[-1]}{kept}")
        return True

    def _record(self, name: str, files: Mapping[str, bytes]) -> None:
        numbers = versions(self.root / name)
        if numbers:
            self.expected[name] = Expected(
                name, numbers[-1], _provenance_parameters(files), tuple(numbers[:-1])
            )

    def publish_all(self, folders: Mapping[str, Mapping[str, bytes]]) -> list[str]:
        """`publish` for each model, in order (the networks before the ensemble that uses
        them); the names of those that changed."""
        return [name for name, files in folders.items() if self.publish(name, files)]

    # -- rolling back

    def _live_files(self, name: str) -> dict[str, bytes]:
        live = self.root / name
        files = {"config.pbtxt": (live / "config.pbtxt").read_bytes()}
        for variant in VARIANTS:
            files[f"configs/{variant}.pbtxt"] = (live / "configs" / f"{variant}.pbtxt").read_bytes()
        for path in sorted(live.iterdir()):
            if path.is_file():  # the labels, and whatever else an export put beside the configs
                files[path.name] = path.read_bytes()
        return files

    def rollback(self, name: str) -> int:
        """Serves `name`'s previous version again, its provenance with it: the previous
        model file becomes the next version (a copy), and the served one is kept, so a
        second rollback returns to it. Ensembles that use `name` state their provenance
        again. The new version's number."""
        live = self.root / name
        numbers = versions(live)
        if not numbers:
            raise RolloutError(f"{name}: no such model in {self.root}")
        current = numbers[-1]
        if not (live / str(current) / MODEL_FILE).is_file():
            raise RolloutError(f"{name} has no model file of its own: roll back one of its members instead")
        if len(numbers) < 2:
            raise RolloutError(f"{name}: only version {current} is kept, there is nothing to roll back to")
        previous = numbers[-2]
        stamp, served = read_stamp(live / str(previous)), read_stamp(live / str(current))
        if stamp is None or "weights" not in stamp:
            raise RolloutError(f"{name}: version {previous} has no export record to say what it holds")
        folder = self.new_version(name)
        shutil.copy2(live / str(previous) / MODEL_FILE, folder / MODEL_FILE)
        served = served or {}
        record = {
            **{k: v for k, v in stamp.items() if k != ROLLED_BACK_FROM},
            ROLLED_BACK_FROM: {
                "version": current,
                "fingerprint": served.get("fingerprint"),
                "weights": served.get("weights"),
                "weights_sha256": served.get("weights_sha256"),
            },
            "copy_of_version": previous,
            "published": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_durably(folder / STAMP, (json.dumps(record, indent=2) + "\n").encode())
        export = stamp_export(stamp)
        files = self._live_files(name)
        for variant in VARIANTS:
            config = parse(files[f"configs/{variant}.pbtxt"].decode())
            files[f"configs/{variant}.pbtxt"] = render(with_export(config, export)).encode()
        self.publish(name, files)
        self.log(
            f"{name}: rolled back to the file of version {previous} ({export.provenance}"
            + (f", weights_sha256 {export.weights_sha256[:12]}…" if export.weights_sha256 else "")
            + f") as version {current + 1}; version {current} kept (a second rollback returns to it)"
        )
        self.restate_ensembles()
        return current + 1

    def restate_ensembles(self) -> list[str]:
        """Every ensemble of the repository states again the provenance its members state
        now (after one of them was rolled back); the names of those that changed."""
        changed = []
        for folder in sorted(p for p in self.root.iterdir() if (p / "configs").is_dir()):
            try:
                files = self._live_files(folder.name)
            except OSError:
                continue
            if not _is_ensemble(files):
                continue
            for variant in VARIANTS:
                config = parse(files[f"configs/{variant}.pbtxt"].decode())
                members = [m for m in config.parameters[PARAM_MEMBERS].string_value.split(",") if m]
                exports = []
                for member in members:
                    path = self.root / member / "configs" / f"{variant}.pbtxt"
                    stated = stated_export(parse(path.read_text())) if path.is_file() else None
                    exports.append((member, stated))
                restated = with_export(config, ensemble_export(exports))
                files[f"configs/{variant}.pbtxt"] = render(restated).encode()
            if self.publish(folder.name, files):
                changed.append(folder.name)
        return changed

    def wait(self, url: str, timeout: float) -> bool:
        """`wait_until_served` for everything this session published or kept."""
        return wait_until_served(url, list(self.expected.values()), timeout, self.log)

    def wait_or_roll_back(self, url: str, timeout: float) -> bool:
        """`wait`; where Triton does not serve a new version this session published, that model
        is rolled back to the version Triton still serves, and NotServed is raised all the
        same (the job fails). A version Triton cannot load is tried again at every poll, and
        stops the next start of a Triton run with --exit-on-error; one that failed Triton's
        warm-up crashed the embedded tritonserver 2.51 after a few tries (docs/architecture.md,
        "Rolling out weights"). So the repository goes back at once to what Triton serves,
        rather than waiting for an operator; the rollback holds until the inputs change."""
        try:
            return self.wait(url, timeout)
        except NotServed as failure:
            undo = [
                item.name
                for item in failure.pending
                if item.name in self.new_versions
                and len(versions(self.root / item.name)) > 1
                and (self.root / item.name / str(item.version) / MODEL_FILE).is_file()
            ]
            if not undo:
                raise
            for name in undo:
                self.rollback(name)
            after = ""
            try:
                self.wait(url, timeout)
            except NotServed as again:
                after = f" Triton does not serve the rollback either: {again.state}."
            raise NotServed(
                f"{failure.state}. Rolled back {', '.join(undo)} to the version Triton served "
                "before, so that its next start loads what it serves now; the rollback holds "
                f"until the inputs change.{after} Read Triton's log for why the new version did "
                "not load (`docker compose logs triton`).",
                failure.pending,
                failure.state,
            ) from None


def describe_versions(repository: Path, name: str) -> list[str]:
    """One line per kept version of `name`: its provenance, and which is served."""
    folder = Path(repository) / name
    numbers = versions(folder)
    lines = []
    for number in reversed(numbers):
        stamp = read_stamp(folder / str(number)) or {}
        role = "served" if number == numbers[-1] else "kept: a rollback serves it"
        has_file = (folder / str(number) / MODEL_FILE).exists()
        weights = stamp.get("weights", "no export record" if has_file else "no model file of its own")
        sha = stamp.get("weights_sha256") or ""
        back = stamp.get(ROLLED_BACK_FROM)
        note = f"; a rollback from version {back.get('version')}" if isinstance(back, dict) else ""
        lines.append(
            f"{name} version {number} ({role}): {weights}" + (f", weights_sha256 {sha}" if sha else "") + note
        )
    return lines


def write_repository(root: Path, networks: Sequence[NetworkEntry], ensemble: EnsembleEntry | None) -> None:
    """The configs of `networks` and `ensemble` published into `root` (with whatever new
    versions are staged for them): the exporter's last step, and a test's way to write a
    repository of entries it made up."""
    with Rollout(root) as rollout:
        rollout.publish_all(repository_files(networks, ensemble))
