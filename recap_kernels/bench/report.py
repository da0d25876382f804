"""Benchmark results as rows, a summary table and a plot, from either entry point.

``make bench`` runs the pytest-benchmark suite (``bench/``), which saves a pytest-benchmark run;
this module turns that run (or the rows of ``python -m recap_kernels bench --json``) into long-format
rows, prints the summary (contender, p50, GB/s, % of the roofline, x torch fused, check) and draws
one panel per workload: each contender's time per step as a bar, the roofline time (the step's bytes
at the bandwidth measured in the same run) as a dashed line.

    python -m recap_kernels.bench.report bench/results            # the newest saved run
    python -m recap_kernels.bench.report RUN.json --json rows.json --plot rows.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

# The contender each suite's speed-ups are relative to: torch's fused step, or for tables the reference
# of each family (torch's sparse Adagrad; the torch backend's row-wise Adagrad, torch has none).
BASELINES = {"kernels": "torch-fused", "recap": "torch-fused",
             ("embedding", "adagrad"): "torch-sparse", ("embedding", "rowwise"): "recap-torch rowwise"}


def baseline(suite: str | None, optimizer: str | None) -> str:
    return BASELINES.get((suite, optimizer)) or BASELINES.get(suite or "recap", "torch-fused")


def rows_from_pytest_benchmark(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per benchmark of a pytest-benchmark JSON file: its ``extra_info`` (written by
    ``bench/conftest.py``) plus its name and the run's commit and machine."""
    out = []
    for bench in doc.get("benchmarks", []):
        info = dict(bench.get("extra_info") or {})
        if "contender" not in info:
            continue
        info.setdefault("name", bench.get("name"))
        info["rounds"] = bench.get("stats", {}).get("rounds")
        out.append(info)
    return add_ratios(out)


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``speedup``: the baseline contender's p50 over the row's (above 1 is faster), per workload and
    optimizer; ``baseline`` names it. Rows without a baseline in the same run get NaN."""
    p50 = {(r.get("suite"), r.get("workload"), r.get("optimizer"), r["contender"]): r["p50"] for r in rows}
    for r in rows:
        r["baseline"] = baseline(r.get("suite"), r.get("optimizer"))
        reference = p50.get((r.get("suite"), r.get("workload"), r.get("optimizer"), r["baseline"]))
        r["speedup"] = reference / r["p50"] if reference else float("nan")
        if r.get("bytes") and r.get("roofline_gbps") and "gbps" not in r:
            r["gbps"] = r["bytes"] / (r["p50"] * 1e6)
            r["frac_of_roofline"] = r["gbps"] / r["roofline_gbps"]
    return rows


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r.get("suite", ""), r.get("workload", ""), r.get("optimizer", ""))].append(r)
    return groups


def _number(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The summary table, one block per workload."""
    if not rows:
        return "no benchmark rows"
    first = rows[0]
    lines = [f"{first.get('device_name', '?')} ({first.get('device', '?')}), torch {first.get('torch', '?')}, "
             f"triton {first.get('triton') or '-'}, git {first.get('git_sha') or '?'}; roofline "
             f"{_number(first.get('roofline_gbps'), '.1f')} GB/s ({first.get('roofline', 'measured')})"]
    header = ("contender", "p50 ms", "p20 ms", "p80 ms", "GB/s", "% roofline", "x baseline", "check")
    for (suite, workload, optimizer), group in _groups(rows).items():
        lines += ["", f"{suite}: {workload} {optimizer} (x baseline: {group[0]['baseline']}'s p50 over the row's)"]
        table = [header] + [
            (r["contender"], _number(r["p50"], ".3f"), _number(r.get("p20"), ".3f"), _number(r.get("p80"), ".3f"),
             _number(r.get("gbps"), ".1f"),
             _number(100 * r["frac_of_roofline"] if r.get("frac_of_roofline") else None, ".0f"),
             _number(r.get("speedup"), ".2f"), str(r.get("check", "-")))
            for r in group
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            cells = [c.ljust(w) if i in (0, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
            lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Bars of p50 time per step (p20-p80 as error bars) per contender, one panel per workload, the
    roofline time dashed where the step's bytes are known. Headless (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    columns = 2 if len(groups) > 1 else 1
    lines = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(7 * columns, 0.9 + 0.45 * max(len(g) for g in groups.values())
                                                     * lines + 0.8 * lines), squeeze=False)
    for ax, ((suite, workload, optimizer), group) in zip(axes.flat, groups.items()):
        names = [r["contender"] for r in group]
        p50 = [r["p50"] for r in group]
        low = [r["p50"] - r.get("p20", r["p50"]) for r in group]
        high = [r.get("p80", r["p50"]) - r["p50"] for r in group]
        colors = ["tab:orange" if n.startswith("recap-") else "tab:blue" for n in names]
        ax.barh(names, p50, xerr=[low, high], color=colors, capsize=2)
        ax.invert_yaxis()
        bytes_ = next((r.get("bytes") for r in group if r.get("bytes")), None)
        roofline = group[0].get("roofline_gbps")
        if bytes_ and roofline:
            floor_ms = bytes_ / (roofline * 1e6)
            ax.axvline(floor_ms, color="black", linestyle="--", linewidth=1)
            ax.text(floor_ms, -0.6, f" roofline {floor_ms:.3g} ms", fontsize=7, va="bottom")
        ax.set_title(f"{suite}: {workload} {optimizer}", fontsize=9)
        ax.set_xlabel("ms per step (p50; p20-p80)", fontsize=8)
        ax.tick_params(labelsize=7)
        if max(p50) > 20 * min(p50):
            ax.set_xscale("log")
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    first = rows[0]
    fig.suptitle(f"recap_kernels: {first.get('device_name', '?')}, torch {first.get('torch', '?')}, "
                 f"git {first.get('git_sha') or '?'}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def newest_run(folder: str | Path) -> Path:
    """The newest pytest-benchmark file saved under ``folder`` (``--benchmark-autosave`` files sit in a
    folder per machine, named ``NNNN_commit_date.json``)."""
    runs = [p for p in Path(folder).rglob("*.json") if p.name[:4].isdigit() and p.name[4] == "_"]
    if not runs:
        raise FileNotFoundError(f"no saved pytest-benchmark run under {folder}")
    return max(runs, key=lambda p: (p.stat().st_mtime, p.name))


def load_rows(source: str | Path) -> tuple[list[dict[str, Any]], Path]:
    """Rows from a pytest-benchmark file, a folder of them (the newest), or ``--json`` rows."""
    path = Path(source)
    if path.is_dir():
        path = newest_run(path)
    doc = json.loads(path.read_text())
    rows = add_ratios(doc) if isinstance(doc, list) else rows_from_pytest_benchmark(doc)
    return rows, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recap_kernels.bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a pytest-benchmark JSON file, a folder of saved runs, or bench --json rows")
    parser.add_argument("--json", metavar="PATH", help="write the long-format rows (default: beside a saved run)")
    parser.add_argument("--plot", metavar="PATH", help="write the PNG (default: beside a saved run)")
    args = parser.parse_args(argv)
    try:
        rows, path = load_rows(args.source)
    except (OSError, ValueError) as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(f"report: {path} has no recap_kernels benchmark rows", file=sys.stderr)
        return 2
    print(f"{path}:")
    print(format_summary(rows))
    saved_run = not isinstance(json.loads(path.read_text()), list)
    json_path = args.json or (path.with_name(path.stem + ".rows.json") if saved_run else None)
    plot_path = args.plot or (path.with_suffix(".png") if saved_run else None)
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {json_path}")
    if plot_path:
        print(f"wrote {plot(rows, plot_path)}")
    bad = [r for r in rows if not str(r.get("check", "OK")).startswith("OK")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
