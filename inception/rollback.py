"""`python -m inception.rollback MODEL...`: serve each model's previous version again.

The one command of the Runbook's rollback (`make rollback MODEL=...`, and in compose
`docker compose run --rm models rollback MODEL...`). Each export keeps the version it
replaced; a rollback publishes that version's file again as the next version, with its
provenance in the configs, through the same lock and whole-folder swap as an export
(`rollout.py`), so Triton loads it beside the serving one and answers throughout. The
rolled-back version is kept in turn: a second rollback returns to it. An export with the
inputs that were rolled back does not bring them back by itself (the models job runs at
every `docker compose up`); new inputs do, or a second rollback. `--list` shows the kept
versions and what each holds. Imports no torch: the file was checked when it was exported,
and is checked again, byte for byte, before it is published.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .contract import REPOSITORY_MODELS
from .rollout import Rollout, RolloutError, describe_versions, versions


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inception.rollback", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", metavar="MODEL", help="networks to roll back")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--list", action="store_true", help="show the kept versions and roll nothing back")
    parser.add_argument(
        "--triton-url",
        default=None,
        metavar="HOST:PORT",
        help="Triton's HTTP address: wait until it serves the rolled-back versions, and fail if it "
        "does not (where no Triton answers, say so and finish)",
    )
    parser.add_argument("--triton-timeout", type=float, default=600.0, help="seconds --triton-url waits")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[rollback] {message}", flush=True)

    if args.list or not args.models:
        names = args.models or [n for n in REPOSITORY_MODELS if versions(args.repository / n)]
        for name in names:
            for line in describe_versions(args.repository, name) or [f"{name}: not in {args.repository}"]:
                print(line)
        if not args.models and not args.list:
            print("name the models to roll back (python -m inception.rollback MODEL...)", file=sys.stderr)
            return 2
        return 0
    try:
        with Rollout(args.repository, log) as rollout:
            for name in args.models:
                rollout.rollback(name)
            if args.triton_url:
                rollout.wait(args.triton_url, args.triton_timeout)
    except RolloutError as exc:
        print(f"[rollback] error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
