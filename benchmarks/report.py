"""Write the results: JSON records per suite, a markdown table, a PNG plot per suite."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from benchmarks.runner import SUITES  # noqa: E402
from fastllm._atomic import atomic_write  # noqa: E402


def shape_label(shape: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items()) or "-"


def _figure(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def _notes(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    extra = row["extra"]
    parts = []
    if "min_ms" in extra:
        parts.append(f"min {extra['min_ms']:.3f} ms")
    if "pct_of_copy_bw" in extra:
        parts.append(f"{extra['pct_of_copy_bw']}% of copy bw")
    if "peak_mem_GiB" in extra:
        parts.append(f"peak {extra['peak_mem_GiB']:.2f} GiB")
    if "rel_err" in extra:
        parts.append(f"rel err {extra['rel_err']:.1e}")
    return ", ".join(parts)


def _versus(row: dict) -> str:
    """On fastllm rows: each reference's time / fastllm's time (>1: fastllm is faster)."""
    if row["provider"] != "fastllm" or row["status"] != "ok":
        return ""
    return " · ".join(f"{p} {r:.2f}x" for p, r in row["ratios"].items())


def markdown(records: list[dict], facts: dict) -> str:
    """One table per suite, rows in run order, preceded by the run's facts."""
    v = facts["versions"]
    libs = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    missing = ", ".join(k for k, val in v.items() if val is None)
    lines = [
        f"# fastllm benchmarks: {facts['device']}",
        "",
        f"- mode: {facts['mode']}; commit {facts['commit']}; {facts.get('seconds', '?')} s; "
        f"1-min load average {facts.get('load_avg_1m_start')} at start, {facts.get('load_avg_1m_end')} at end",
        f"- {libs}" + (f"; not installed: {missing}" if missing else ""),
        f"- copy bandwidth (device-to-device, read+write): {facts['copy_bandwidth_GBps']:.1f} GB/s",
        f"- {facts['interpreter']}",
        "- `vs` column: the reference's median time / fastllm's median time, same run (>1: fastllm faster)",
    ]
    by_suite: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_suite[r["suite"]].append(r)
    for suite in sorted(by_suite, key=lambda s: SUITES.index(s) if s in SUITES else len(SUITES)):
        lines += ["", f"## {suite}", ""]
        lines.append("| case | shape | dtype | provider | median ms | figure | vs | notes |")
        lines.append("|---|---|---|---|---:|---:|---|---|")
        for r in by_suite[suite]:
            ms = "-" if r["median_ms"] is None else f"{r['median_ms']:.3f}"
            fig = "-" if r["value"] is None else f"{_figure(r['value'])} {r['metric']}"
            lines.append(
                f"| {r['case']} | {shape_label(r['shape'])} | {r['dtype']} | {r['provider']} | {ms} | {fig} "
                f"| {_versus(r)} | {_notes(r)} |"
            )
    return "\n".join(lines) + "\n"


def _save_figure(fig: plt.Figure, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def _write_text(path: Path, text: str) -> None:
    # Every result file is replaced atomically: an interrupted run leaves the previous file, never a torn one.
    with atomic_write(path, "w") as f:
        f.write(text)


def plot(suite: str, records: list[dict], path: Path) -> None:
    """Horizontal bars of the figure per case, one bar per provider, one panel per metric."""
    ok = [r for r in records if r["status"] == "ok"]
    metrics = list(dict.fromkeys(r["metric"] for r in ok))
    if not metrics:
        fig, ax = plt.subplots(figsize=(8, 2))
        reasons = sorted({r["reason"] for r in records}) or ["no cases"]
        ax.text(0.5, 0.5, f"{suite}: nothing measured\n" + "\n".join(reasons), ha="center", va="center", wrap=True)
        ax.axis("off")
        _save_figure(fig, path)
        plt.close(fig)
        return
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}
    panels = []
    for metric in metrics:
        rows = [r for r in ok if r["metric"] == metric]
        labels = list(dict.fromkeys(f"{r['case']}\n{shape_label(r['shape'])}" for r in rows))
        panels.append((metric, rows, labels))
    height = sum(max(2.0, 0.35 * len(labels) * len(providers)) for _, _, labels in panels) + 1
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, height), squeeze=False)
    for ax, (metric, rows, labels) in zip(axes[:, 0], panels, strict=True):
        width = 0.8 / len(providers)
        for j, p in enumerate(providers):
            ys, xs = [], []
            for r in rows:
                if r["provider"] == p:
                    ys.append(labels.index(f"{r['case']}\n{shape_label(r['shape'])}") + j * width)
                    xs.append(r["value"])
            if xs:
                ax.barh(ys, xs, height=width, color=colors[p], label=p)
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel(f"{metric}, log scale (higher is better)")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].set_title(f"{suite}: {ok[0]['device']}")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def write(records: list[dict], facts: dict, out: Path) -> str:
    """Write <suite>.json, <suite>.png, run.json and results.md under ``out``; returns the markdown.

    results.md also keeps the suites of earlier runs in ``out`` that this run did not repeat.
    """
    out.mkdir(parents=True, exist_ok=True)
    by_suite: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_suite[r["suite"]].append(r)
    for suite, rows in by_suite.items():
        _write_text(out / f"{suite}.json", json.dumps(rows, indent=1) + "\n")
        plot(suite, rows, out / f"{suite}.png")
    _write_text(out / "run.json", json.dumps(facts, indent=1) + "\n")
    kept = []
    for suite in SUITES:
        path = out / f"{suite}.json"
        if suite not in by_suite and path.exists():
            kept += json.loads(path.read_text())
    text = markdown(records + kept, facts)
    _write_text(out / "results.md", text)
    return text
