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
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from benchmarks import environment
from benchmarks.harness import METRICS, Case, Settings, Skip, Timing, synchronize, time_interleaved, time_ms

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


def _comparison(suite: str, case: str, shape: dict[str, int], dtype: str) -> tuple:
    """Cases (and their rows) with the same key are compared with each other (``add_ratios``)."""
    return suite, case, tuple(sorted(shape.items())), dtype


def _groups(cases: list[Case], settings: Settings) -> list[list[Case]]:
    """Cases in run order, grouped to be timed together: on the CPU every provider of a comparison (interleaved, see
    ``time_interleaved``; they are set up together and held in memory at once), on CUDA each case alone (so that a
    case's peak memory is its own)."""
    if settings.cuda:
        return [[case] for case in cases]
    groups: dict[tuple, list[Case]] = {}
    for case in cases:
        groups.setdefault(_comparison(case.suite, case.case, case.shape, case.dtype), []).append(case)
    return list(groups.values())


def _failed_row(case: Case, exc: Exception) -> dict:
    """A Skip or an exception of a case's setup or timing as a row with the reason and no number."""
    base = (case.suite, case.case, case.shape, case.dtype, case.provider)
    if isinstance(exc, Skip):
        return _row(*base, "skipped", str(exc), case.metric)
    # a provider failing must not stop the run; the row says why
    trace = "".join(traceback.format_exception(exc, limit=3))
    tqdm.write(f"[{case.suite}/{case.case}/{case.provider}] failed:\n{trace}")
    message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return _row(*base, "error", f"{type(exc).__name__}: {message}", case.metric)


def _ok_row(case: Case, timing: Timing, extra: dict, copy_gbps: float | None) -> dict:
    ms = timing.median_ms
    value = case.work / (ms * 1e-3) / METRICS[case.metric]
    extra = {**case.extra, **extra, "min_ms": timing.min_ms}
    if case.metric == "GB/s" and copy_gbps:
        extra["pct_of_copy_bw"] = round(100 * value / copy_gbps, 1)
    base = (case.suite, case.case, case.shape, case.dtype, case.provider)
    return _row(*base, "ok", None, case.metric, median_ms=ms, value=value, reps=timing.reps, timer=timing.timer,
                extra=extra)  # fmt: skip


def _prepare(case: Case, settings: Settings) -> tuple[object, dict]:
    """(the callable to time, or a Timing the case took itself; extra figures) from the case's setup."""
    prepared = case.setup()
    fn, extra = prepared if isinstance(prepared, tuple) else (prepared, {})
    if case.track_memory and settings.cuda and callable(fn):
        extra = {**extra, "peak_mem_GiB": _peak_memory_gib(fn, settings.device)}
    return fn, extra


def measure(group: list[Case], settings: Settings, copy_gbps: float | None) -> list[dict]:
    """Set up and time a group of cases (one case, or the interleaved providers of one comparison): a row each."""
    try:
        return _set_up_and_time(group, settings, copy_gbps)
    finally:  # the group's calls and inputs are gone with that function's frame: free their memory
        gc.collect()
        if settings.cuda:
            torch.cuda.empty_cache()


def _set_up_and_time(group: list[Case], settings: Settings, copy_gbps: float | None) -> list[dict]:
    rows: list[dict | None] = [None] * len(group)
    timed: list[tuple[int, Callable[[], object], dict]] = []  # (index, call, extra) of the cases to time
    for index, case in enumerate(group):
        try:
            fn, extra = _prepare(case, settings)
        except Exception as exc:
            rows[index] = _failed_row(case, exc)
            continue
        if isinstance(fn, Timing):  # a case that must time itself (e.g. one load per fresh process)
            rows[index] = _ok_row(case, fn, extra, copy_gbps)
        else:
            timed.append((index, fn, extra))
    timings: list[Timing] | None = None
    try:
        timings = time_interleaved([fn for _, fn, _ in timed], settings)
    except Exception as exc:
        if len(timed) == 1:
            rows[timed[0][0]] = _failed_row(group[timed[0][0]], exc)
            timed = []
        # else: one of the interleaved calls failed; time each alone below, so the failing row says why
    for position, (index, fn, extra) in enumerate(timed):
        try:
            timing = timings[position] if timings else time_ms(fn, settings)
            rows[index] = _ok_row(group[index], timing, extra, copy_gbps)
        except Exception as exc:
            rows[index] = _failed_row(group[index], exc)
    return rows


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
            groups[_comparison(r["suite"], r["case"], r["shape"], r["dtype"])].append(r)
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
    bar = tqdm(total=len(cases), desc="benchmarks", unit="case", file=sys.stderr, dynamic_ncols=True)
    done: set[int] = set()  # ids of the cases measured
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for group in _groups(cases, settings):
            providers = "+".join(case.provider for case in group)
            bar.set_postfix_str(f"{group[0].suite}/{group[0].case}/{providers}", refresh=True)
            records.extend(measure(group, settings, facts["copy_bandwidth_GBps"]))
            done.update(id(case) for case in group)
            bar.update(len(group))
    except (Interrupted, KeyboardInterrupt) as exc:
        # Keep what was measured (the GPU script runs under `timeout`); the rest says why it has no number.
        reason = f"not run: interrupted ({exc or 'Ctrl-C'}) before this case"
        facts["interrupted"] = True
        for case in [case for case in cases if id(case) not in done]:
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
