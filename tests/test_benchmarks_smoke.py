"""Smoke test of the benchmark runner: ``python -m benchmarks --tiny`` on every CPU suite.

Runs the real command in a subprocess (the runner unsets TRITON_INTERPRET, which conftest sets
for the rest of the tests) with tiny shapes in a temp dir, then checks what it wrote: the JSON
schema of every record, finite ratios on measured rows, reasons and no numbers on skipped rows,
no fastllm row in error and every fastllm correctness figure (``extra.rel_err``) under its dtype's
tolerance, the markdown table and one PNG per suite.

``python tests/test_benchmarks_smoke.py RESULTS_DIR`` applies the fastllm checks to any results folder
(benchmarks/gpu_check.sh runs it on the GPU's quick results) and exits 1 listing what failed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUITES = ("quantize", "nf4_matmul", "attention", "qlora")
# What a fastllm row's rel_err (against fastllm.reference in fp32/fp64) may reach, by the row's dtype.
REL_ERR_TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}
# (suite, case prefix) of the fastllm rows that must carry a correctness figure when measured.
CHECKED_CASES = (("nf4_matmul", ""), ("qlora", ""), ("attention", ""))
REQUIRED = {
    "suite": str,
    "case": str,
    "shape": dict,
    "dtype": str,
    "provider": str,
    "status": str,
    "metric": str,
    "ratios": dict,
    "extra": dict,
    "device": str,
    "versions": dict,
    "commit": str,
}


def test_tiny_run_writes_valid_results(tmp_path: Path) -> None:
    """One test (not four) so pytest-xdist does not run the benchmark subprocess once per worker."""
    out, stdout = _run(tmp_path)
    rows = _records(out)
    _check_schema(rows)
    _check_measured(rows)
    _check_skipped(rows)
    assert fastllm_problems(rows) == []
    _check_markdown_and_plots(out, stdout)


def _run(out: Path) -> tuple[Path, str]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # the runner must drop it and say so
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--device", "cpu", "--out", str(out), "--suite", *SUITES],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "unset TRITON_INTERPRET" in proc.stderr
    return out, proc.stdout


def _records(out: Path) -> list[dict]:
    rows = []
    for suite in SUITES:
        path = out / f"{suite}.json"
        assert path.is_file(), f"{path.name} not written"
        suite_rows = json.loads(path.read_text())
        assert suite_rows, f"{path.name} holds no records"
        assert {r["suite"] for r in suite_rows} == {suite}
        rows += suite_rows
    return rows


def _check_schema(rows: list[dict]) -> None:
    for r in rows:
        for key, kind in REQUIRED.items():
            assert isinstance(r.get(key), kind), f"{key!r} of {r.get('case')}/{r.get('provider')}: {r.get(key)!r}"
        assert r["status"] in ("ok", "skipped", "error")
        assert r["versions"]["torch"], r["versions"]


def _check_measured(rows: list[dict]) -> None:
    measured = [r for r in rows if r["status"] == "ok"]
    # Every CPU suite measures something (attention: its decode and model-step cases), against a reference.
    assert {r["suite"] for r in measured} == {"quantize", "nf4_matmul", "attention", "qlora"}
    for r in measured:
        where = f"{r['suite']}/{r['case']}/{r['provider']}"
        assert r["reason"] is None, where
        assert isinstance(r["median_ms"], float) and 0 < r["median_ms"] < math.inf, where
        assert isinstance(r["value"], float) and 0 < r["value"] < math.inf, where
        assert r["metric"] in ("GB/s", "TFLOP/s", "tokens/s"), where
        assert 0 < r["extra"]["min_ms"] <= r["median_ms"], where
        others = {
            o["provider"]
            for o in measured
            if (o["suite"], o["case"], o["shape"], o["dtype"]) == (r["suite"], r["case"], r["shape"], r["dtype"])
        } - {r["provider"]}
        assert set(r["ratios"]) == others, where
        times = {o["provider"]: o["median_ms"] for o in measured if o["case"] == r["case"] and o["shape"] == r["shape"]}
        for provider, ratio in r["ratios"].items():
            assert math.isfinite(ratio) and ratio > 0, (where, provider, ratio)
            assert math.isclose(ratio, times[provider] / r["median_ms"], rel_tol=1e-9), (where, provider)
    # fastllm itself is measured, and compared at least with the dense matmul (always available).
    fastllm_fwd = [r for r in measured if (r["suite"], r["case"], r["provider"]) == ("nf4_matmul", "fwd", "fastllm")]
    assert fastllm_fwd and all("dense" in r["ratios"] for r in fastllm_fwd)


def fastllm_problems(rows: list[dict]) -> list[str]:
    """What is wrong with the fastllm rows: an error (fastllm raised), a checked case measured without its
    ``rel_err``, or a ``rel_err`` over the tolerance of the row's dtype. Empty when all is well."""
    problems = []
    for r in rows:
        if not r["provider"].startswith("fastllm"):
            continue
        where = f"{r['suite']}/{r['case']}/{r['provider']} {r['shape']} {r['dtype']}"
        if r["status"] == "error":
            problems.append(f"{where}: error: {r['reason']}")
            continue
        err = r["extra"].get("rel_err")
        checked = any(r["suite"] == suite and r["case"].startswith(case) for suite, case in CHECKED_CASES)
        if r["status"] == "ok" and checked and err is None:
            problems.append(f"{where}: measured without a rel_err")
        elif err is not None and not (isinstance(err, float) and err < REL_ERR_TOL[r["dtype"]]):
            problems.append(f"{where}: rel_err {err} >= {REL_ERR_TOL[r['dtype']]}")
    return problems


def _check_skipped(rows: list[dict]) -> None:
    skipped = [r for r in rows if r["status"] != "ok"]
    assert any(r["suite"] == "attention" and "needs CUDA" in r["reason"] for r in skipped)
    assert any(r["suite"] == "qlora" and "needs CUDA" in r["reason"] for r in skipped)
    for r in skipped:
        assert isinstance(r["reason"], str) and r["reason"], r
        assert r["median_ms"] is None and r["value"] is None and r["ratios"] == {}, r


def _check_markdown_and_plots(out: Path, stdout: str) -> None:
    table = (out / "results.md").read_text()
    assert table in stdout
    for suite in SUITES:
        assert f"## {suite}" in table
        png = out / f"{suite}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png.name} is not a PNG"
    assert "| case | shape | dtype | provider | median ms | figure | vs | notes |" in table
    assert "needs CUDA" in table
    run_facts = json.loads((out / "run.json").read_text())
    assert run_facts["mode"] == "tiny" and run_facts["copy_bandwidth_GBps"] > 0


if __name__ == "__main__":
    results = [path for path in sorted(Path(sys.argv[1]).glob("*.json")) if path.name != "run.json"]
    found = fastllm_problems([r for path in results for r in json.loads(path.read_text())])
    if not results:
        found = [f"no <suite>.json results in {sys.argv[1]}"]
    print("\n".join(found) or f"fastllm rows of {len(results)} suites: no error, every rel_err under its tolerance")
    sys.exit(1 if found else 0)
