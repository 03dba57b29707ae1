"""The benchmark runner's interleaved CPU timing: the providers of one comparison are set up together and timed
round by round; a provider that fails (in setup or in its call) gets an error row and the others keep their numbers.
On CUDA every case is set up and timed alone (its peak memory is its own)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root holds `benchmarks`

from benchmarks import runner  # noqa: E402
from benchmarks.harness import Case, Settings, Skip, time_interleaved  # noqa: E402

SETTINGS = Settings(torch.device("cpu"), quick=True, tiny=True)


def _case(provider: str, setup, case: str = "step") -> Case:
    return Case("suite", case, {"N": 1}, "bfloat16", provider, "tokens/s", 10.0, setup)


def test_time_interleaved_alternates_calls_in_rotating_order():
    log: list[str] = []
    fns = [lambda name=name: log.append(name) for name in "abc"]
    timings = time_interleaved(fns, SETTINGS)
    warmup = 3  # one warm-up call each in tiny mode, in order
    assert log[:warmup] == ["a", "b", "c"]
    rounds = [log[i : i + 3] for i in range(warmup, len(log), 3)]
    assert len(rounds) >= 3 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert [r[0] for r in rounds[:3]] == ["a", "b", "c"]  # the first call of a round rotates
    assert [t.reps for t in timings] == [len(rounds)] * 3
    assert all("interleaved" in t.timer and t.min_ms <= t.median_ms for t in timings)


def test_cases_are_grouped_by_comparison_on_cpu_and_alone_on_cuda():
    setups: list[str] = []

    def setup(name: str):
        setups.append(name)
        return lambda: None

    cases = [
        _case("fastllm", lambda: setup("fastllm")),
        _case("other-case", lambda: setup("other-case"), case="other"),
        _case("ref", lambda: setup("ref")),
    ]
    groups = runner._groups(cases, SETTINGS)
    assert [[c.provider for c in g] for g in groups] == [["fastllm", "ref"], ["other-case"]]
    cuda = runner._groups(cases, Settings(torch.device("cuda")))
    assert [[c.provider for c in g] for g in cuda] == [["fastllm"], ["other-case"], ["ref"]]
    rows = runner.measure(groups[0], SETTINGS, None)
    assert setups == ["fastllm", "ref"]  # both set up before either is timed
    assert [(r["provider"], r["status"]) for r in rows] == [("fastllm", "ok"), ("ref", "ok")]
    assert all("interleaved" in r["timer"] and r["value"] > 0 for r in rows)


def test_a_failing_provider_in_a_group_gets_an_error_row_and_the_others_are_timed():
    calls = {"n": 0}

    def broken():
        calls["n"] += 1
        if calls["n"] > 1:  # passes its first (warm-up) call, then fails mid-run
            raise RuntimeError("kernel failed")

    def skipped():
        raise Skip("not here")

    group = [_case("fastllm", lambda: lambda: None), _case("bad", lambda: broken), _case("skip", skipped)]
    rows = runner.measure(group, SETTINGS, None)
    assert [r["status"] for r in rows] == ["ok", "error", "skipped"]
    assert "kernel failed" in rows[1]["reason"] and rows[2]["reason"] == "not here"
    assert rows[0]["median_ms"] is not None and rows[1]["median_ms"] is None


def test_a_single_failing_case_gets_an_error_row():
    def fails():
        raise ValueError("bad shape")

    rows = runner.measure([_case("fastllm", lambda: fails)], SETTINGS, None)
    assert rows[0]["status"] == "error" and "ValueError: bad shape" in rows[0]["reason"]
