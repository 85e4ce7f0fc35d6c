"""The Markdown of `bench/gpu/stack.py`'s results: the tables `bench/README.md` takes, made
from the JSON alone (so a run cut short still reads), every missing figure shown as such."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def num(value: Any, spec: str = ".0f", suffix: str = "") -> str:
    if value is None or isinstance(value, str):
        return "–" if value is None else value
    return f"{value:{spec}}{suffix}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], right_from: int = 1) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("| " + " | ".join("---" if i < right_from else "---:" for i in range(len(header))) + " |")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def stage(results: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    found: Mapping[str, Any] = results.get("stages", {}).get(name, {})
    return found


def environment_lines(results: Mapping[str, Any]) -> list[str]:
    env = results.get("environment", {})
    device = env.get("gpu") or env.get("device", "?")
    facts = [
        f"{device}",
        f"torch {env.get('torch', '?')}",
        *([f"CUDA {env['cuda']}", f"cuDNN {env['cudnn']}"] if env.get("cuda") else []),
        f"{env.get('cpu_cores', '?')} CPU cores",
        f"Python {env.get('python', '?')}",
    ]
    return [
        f"Run {results.get('date', '?')}, `{results.get('command', '')}`, "
        f"{num(results.get('total_seconds'), '.0f')} s in all; " + ", ".join(facts) + ".",
    ]


def stages_table(results: Mapping[str, Any]) -> list[str]:
    rows = []
    for name, record in results.get("stages", {}).items():
        status = str(record.get("status", "running"))
        if record.get("error"):
            status += f": {record['error'].splitlines()[0][:160]}"
        rows.append(
            [name, status.replace("|", "/"), num(record.get("seconds"), ".1f"), num(record.get("budget_s"))]
        )
    return table(["stage", "status", "seconds", "budget"], rows, right_from=2)


def accuracy_table(results: Mapping[str, Any]) -> list[str]:
    rows = []
    for model, check in stage(results, "accuracy").items():
        if not isinstance(check, Mapping) or "max_abs_diff" not in check:
            continue
        rows.append(
            [
                model,
                check["precision"],
                num(check["images"]),
                num(check["max_abs_diff"], ".2g"),
                num(check["top1_same"], ".0%"),
                "yes" if check["passed"] else "**no**",
            ]
        )
    return table(["model", "precision", "photos", "max abs Δp", "top-1 same", "passed"], rows, right_from=2)


def side_by_side_table(rows_in: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = []
    for row in rows_in:
        head = [row.get("network", "?"), num(row.get("batch")), num(row.get("clients"))]
        if "skipped" in row:
            rows.append([*head, f"skipped: {row['skipped']}", "", "", "", "", ""])
            continue
        local, served = row["in_process"], row["triton"]
        rows.append(
            [
                *head,
                num(local["images_per_s"]),
                num(served["images_per_s"]),
                num(row.get("ratio"), ".2f"),
                f"{num(local['p50_ms'], '.1f')} / {num(local['p99_ms'], '.1f')}",
                f"{num(served['p50_ms'], '.1f')} / {num(served['p99_ms'], '.1f')}",
                num(served["errors"]),
            ]
        )
    header = [
        "network",
        "batch",
        "clients",
        "in-process img/s",
        "Triton img/s",
        "Triton / in-process",
        "in-process p50 / p99 ms (a call)",
        "Triton p50 / p99 ms (a request)",
        "errors",
    ]
    return table(header, rows)


def gateway_table(rows_in: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = []
    for row in rows_in:
        head = [
            str(row.get("model", "")),
            "on" if row.get("admission") else "off",
            num(row.get("concurrency")),
        ]
        if "skipped" in row:
            rows.append([*head, f"skipped: {row['skipped']}", *[""] * 11])
            continue
        cpu = row.get("cpu", {})
        rows.append(
            [
                *head,
                num(row["images_per_s"], ".0f"),
                num(row["p50_ms"], ".0f"),
                num(row["p99_ms"], ".0f"),
                num(row["answered"]),
                num(row["shed"]),
                num(row["errors"]),
                num(row["decode_share"], ".0%"),
                num(row["triton_share"], ".0%"),
                num(cpu.get("gateway_cores"), ".1f"),
                num(cpu.get("triton_cores"), ".1f"),
                num(cpu.get("machine_busy"), ".0%"),
                num(row.get("client_cores"), ".1f"),
            ]
        )
    header = [
        "model",
        "admission",
        "concurrency",
        "img/s",
        "p50 ms",
        "p99 ms",
        "answered",
        "shed (503/429)",
        "errors",
        "decode share",
        "Triton share",
        "gateway cores",
        "Triton cores",
        "machine busy",
        "client cores",
    ]
    return table(header, rows)


def tuning_lines(results: Mapping[str, Any]) -> list[str]:
    tuned = stage(results, "tuning")
    variants: Mapping[str, Any] = tuned.get("variants", {})
    if not variants:
        return ["No figures (the stage did not run)."]
    batches = sorted({int(b) for v in variants.values() for b in v.get("batches", {})})
    rows = []
    for name, entry in variants.items():
        figures = entry.get("batches", {})
        graph = entry.get("graph") or {}
        agree = entry.get("agreement")
        rows.append(
            [
                name,
                *(num(figures.get(str(b), {}).get("images_per_s")) for b in batches),
                num(figures.get(str(batches[0]), {}).get("p50_ms"), ".2f") if batches else "–",
                ", ".join(f"{k}: {v}" for k, v in (graph.get("conv_benchmark") or {}).items()),
                f"{graph.get('weights_nchw_only', '–')} of {graph.get('weights_4d', '–')}",
                num(agree["top1_agree"], ".0%") if agree else "reference",
                num(agree["max_abs_prob"], ".2g") if agree else "",
                ("yes" if agree["passed"] else "no") if agree else "",
            ]
        )
    header = [
        "variant",
        *(f"b{b} img/s" for b in batches),
        f"b{batches[0]} p50 ms" if batches else "p50 ms",
        "conv benchmark",
        "NCHW-only weights",
        "top-1 agree",
        "max abs Δp",
        "passed",
    ]
    lines = [
        f"Network `{tuned.get('network')}`, {tuned.get('photos')} photo crops; rule: {tuned.get('rule')}.",
        "",
    ]
    lines += table(header, rows)
    streams = tuned.get("instances", {})
    lines += [
        "",
        f"One instance {num(streams.get('1_instance_images_per_s'))} img/s, two (two threads, two CUDA "
        f"streams) {num(streams.get('2_instances_images_per_s'))} img/s "
        f"at batch {tuned.get('decided_at_batch')}. "
        f"Winner: **{tuned.get('winner')}**, max_batch_size {tuned.get('max_batch_size')}, "
        f"{tuned.get('instance_count')} instance(s).",
    ]
    if tuned.get("not_traced"):
        lines.append(f"Not traced: {tuned['not_traced']}")
    return lines


def winner_lines(results: Mapping[str, Any]) -> list[str]:
    won = stage(results, "winner")
    if "rows" not in won:
        return ["No figures (the stage did not run or failed)."]
    check = won.get("accuracy", {})
    lines = [
        f"`{won.get('variant')}`, max_batch_size {won.get('max_batch_size')}, {won.get('instances')} "
        f"instance(s), ready after {num(won.get('ready_after_s'), '.0f')} s; "
        "against the same module in-process: "
        f"max abs Δp {num(check.get('max_abs_diff'), '.2g')}, top-1 same {num(check.get('top1_same'), '.0%')}"
        f" ({'passed' if check.get('passed') else 'not passed'}).",
        "",
    ]
    return lines + side_by_side_table(won["rows"])


def markdown(results: Mapping[str, Any]) -> str:
    lines = ["# The stack on a GPU (`python -m bench.gpu.stack`)", ""]
    lines += [*environment_lines(results), ""]
    lines += [*stages_table(results), "", "## Triton against the same model.pt in-process: answers", ""]
    lines += accuracy_table(results)
    lines += ["", "## Triton (gRPC, dynamic batching) against in-process", ""]
    lines += side_by_side_table(stage(results, "side_by_side").get("rows", []))
    lines += ["", "## The gateway end to end (JPEG over HTTP, top-5)", ""]
    lines += gateway_table(stage(results, "gateway").get("rows", []))
    lines += ["", "## Tuning, in-process", ""]
    lines += tuning_lines(results)
    lines += ["", "## The winner through Triton", ""]
    lines += winner_lines(results)
    return "\n".join(lines)
