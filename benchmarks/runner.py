"""Run the cases of the chosen suites and turn them into records (one dict per measurement)."""

from __future__ import annotations

import gc
import importlib
import os
import signal
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Sequence

import torch
from tqdm import tqdm

from benchmarks import environment
from benchmarks.harness import METRICS, Case, Settings, Skip, Timing, synchronize, time_ms

SUITES = ("quantize", "nf4_matmul", "attention", "qlora", "load", "model")

# Every record has these keys; "ok" rows carry numbers, other rows a reason and None numbers.
RECORD_FIELDS = (
    "suite",
    "case",
    "shape",
    "dtype",
    "provider",
    "status",
    "reason",
    "median_ms",
    "metric",
    "value",
    "ratios",
    "reps",
    "timer",
    "extra",
    "device",
    "versions",
    "commit",
)


def collect(suites: Sequence[str], settings: Settings) -> tuple[list[Case], list[dict]]:
    """The cases of every suite, and one skipped record per suite that cannot run at all."""
    cases: list[Case] = []
    skipped: list[dict] = []
    for name in suites:
        module = importlib.import_module(f"benchmarks.suite_{name}")
        try:
            cases.extend(module.cases(settings))
        except Skip as exc:
            skipped.append(_row(name, "*", {}, "*", "*", "skipped", str(exc), "-"))
    return cases, skipped


def _row(suite, case, shape, dtype, provider, status, reason, metric, **numbers) -> dict:
    row = dict(suite=suite, case=case, shape=shape, dtype=dtype, provider=provider, status=status, reason=reason)
    row.update(median_ms=None, metric=metric, value=None, ratios={}, reps=None, timer=None, extra={})
    row.update(numbers)
    return row


def measure(case: Case, settings: Settings, copy_gbps: float | None) -> dict:
    """Set up and time one case; a Skip or an exception becomes a row with the reason and no number."""
    base = (case.suite, case.case, case.shape, case.dtype, case.provider)
    try:
        prepared = case.setup()
        fn, extra = prepared if isinstance(prepared, tuple) else (prepared, {})
        # A case that must time itself (e.g. one load per fresh process) returns its Timing instead of a callable.
        timing = fn if isinstance(fn, Timing) else time_ms(fn, settings)
        extra = {**case.extra, **extra, "min_ms": timing.min_ms}
        if case.track_memory and settings.cuda and callable(fn):
            extra["peak_mem_GiB"] = _peak_memory_gib(fn, settings.device)
    except Skip as exc:
        return _row(*base, "skipped", str(exc), case.metric)
    except Exception as exc:  # a provider failing must not stop the run; the row says why
        tqdm.write(f"[{case.suite}/{case.case}/{case.provider}] failed:\n{traceback.format_exc(limit=3)}")
        message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        return _row(*base, "error", f"{type(exc).__name__}: {message}", case.metric)
    finally:
        prepared = fn = None
        gc.collect()
        if settings.cuda:
            torch.cuda.empty_cache()
    ms = timing.median_ms
    value = case.work / (ms * 1e-3) / METRICS[case.metric]
    if case.metric == "GB/s" and copy_gbps:
        extra["pct_of_copy_bw"] = round(100 * value / copy_gbps, 1)
    return _row(
        *base, "ok", None, case.metric, median_ms=ms, value=value, reps=timing.reps, timer=timing.timer, extra=extra
    )


def _peak_memory_gib(fn, device: torch.device) -> float:
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


class Interrupted(BaseException):
    """SIGTERM during a run (a BaseException, so a provider's ``except Exception`` does not swallow it)."""


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted("SIGTERM, e.g. a time limit")


def add_ratios(records: list[dict]) -> None:
    """For each measured row: ratios[p] = median_ms of provider p / median_ms of this row (same case).

    So on the fastllm row, ratios["bnb"] = 2.0 means fastllm took half the time of bitsandbytes.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r["status"] == "ok":
            groups[(r["suite"], r["case"], tuple(sorted(r["shape"].items())), r["dtype"])].append(r)
    for rows in groups.values():
        for r in rows:
            r["ratios"] = {o["provider"]: o["median_ms"] / r["median_ms"] for o in rows if o is not r}


def run(suites: Sequence[str], settings: Settings) -> tuple[list[dict], dict]:
    """Time every case of ``suites``; returns (records, run facts)."""
    started = time.time()
    facts = {
        "device": environment.device_name(settings.device),
        "device_slug": environment.device_slug(settings.device),
        "versions": environment.versions(),
        "commit": environment.git_commit(),
        "interpreter": environment.interpreter_note(),
        "mode": "tiny" if settings.tiny else "quick" if settings.quick else "full",
        "load_avg_1m_start": round(os.getloadavg()[0], 2),
    }
    facts["copy_bandwidth_GBps"] = environment.copy_bandwidth_gbps(settings.device, 64 if settings.tiny else 1024)
    cases, records = collect(suites, settings)
    bar = tqdm(cases, desc="benchmarks", unit="case", file=sys.stderr, dynamic_ncols=True)
    done = 0
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for case in bar:
            bar.set_postfix_str(f"{case.suite}/{case.case}/{case.provider}", refresh=True)
            records.append(measure(case, settings, facts["copy_bandwidth_GBps"]))
            done += 1
    except (Interrupted, KeyboardInterrupt) as exc:
        # Keep what was measured (the GPU script runs under `timeout`); the rest says why it has no number.
        reason = f"not run: interrupted ({exc or 'Ctrl-C'}) before this case"
        facts["interrupted"] = True
        for case in cases[done:]:
            records.append(
                _row(case.suite, case.case, case.shape, case.dtype, case.provider, "skipped", reason, case.metric)
            )
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
    add_ratios(records)
    for r in records:
        r.update(device=facts["device"], versions=facts["versions"], commit=facts["commit"])
    facts["seconds"] = round(time.time() - started, 1)
    facts["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    return records, facts
