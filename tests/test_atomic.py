"""fastllm._atomic: atomic_write / atomic_directory / read_together, with a failure injected at every step."""

from __future__ import annotations

import importlib
import json
import os
import signal
import stat
import sys
import threading
from pathlib import Path

import pytest
from _faults import every_fault, every_kill, fsync_counted

from fastllm import _atomic
from fastllm._atomic import atomic_directory, atomic_write, read_together

REPO = Path(__file__).resolve().parent.parent


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _visible(directory: Path) -> dict[str, bytes]:
    """Every non-hidden file under ``directory`` (relative path -> bytes)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[str(rel)] = path.read_bytes()
    return out


def _hidden_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_atomic_write_replaces_and_keeps_mode(tmp_path):
    target = tmp_path / "a.json"
    with atomic_write(target, "w") as f:
        f.write("one")
    assert target.read_text() == "one"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()  # as a plain open() would create it
    target.chmod(0o640)
    with atomic_write(target) as f:
        f.write(b"two")
    assert target.read_bytes() == b"two" and stat.S_IMODE(target.stat().st_mode) == 0o640
    with pytest.raises(RuntimeError, match="boom"), atomic_write(target, "w") as f:
        f.write("three")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"two"
    assert _hidden_leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="mode must be 'wb' or 'w'"), atomic_write(target, "a"):
        pass


def test_atomic_write_through_symlink(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    with atomic_write(link, "w") as f:
        f.write("new")
    assert link.is_symlink() and real.read_text() == "new"


def test_atomic_write_every_fault(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    target.write_text("old")

    def check(n, error):
        assert target.read_text() in (("old", "new") if error else ("new",)), n

    def run():
        with atomic_write(target, "w") as f:
            f.write("new")

    with fsync_counted(monkeypatch):
        steps = every_fault(run, check, reset=lambda: target.write_text("old"))
    assert steps >= 4  # open, fsync, rename, fsync of the directory (at least)


def _write_version(staging: Path, version: str) -> None:
    (staging / "weights.bin").write_bytes(version.encode() * 1000)
    (staging / "config.json").write_text(f'{{"version": "{version}"}}')


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_directory_swaps_and_keeps_foreign_entries(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "adapter"
    with atomic_directory(target) as staging:
        _write_version(staging, "v1")
    assert _visible(target)["config.json"] == b'{"version": "v1"}'
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~_umask()
    (target / "README.md").write_text("mine")
    (target / "sub").mkdir()
    (target / "sub" / "big.bin").write_bytes(b"x" * 100)
    readme_inode = (target / "README.md").stat().st_ino
    with atomic_directory(target, keep=lambda name: name != "sub") as staging:
        _write_version(staging, "v2")
    assert _visible(target) == {
        "README.md": b"mine",
        "config.json": b'{"version": "v2"}',
        "weights.bin": b"v2" * 1000,
    }
    assert (target / "README.md").stat().st_ino == readme_inode  # carried as a hard link, not copied
    with atomic_directory(target) as staging:  # keep=None: the new version is all there is
        _write_version(staging, "v3")
    assert sorted(_visible(target)) == ["config.json", "weights.bin"]
    assert _hidden_leftovers(tmp_path) == []


def test_atomic_directory_refusals(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"), atomic_directory(tmp_path / "file"):
        pass
    monkeypatch.chdir(tmp_path)
    for where in (".", tmp_path, tmp_path.parent):
        with pytest.raises(ValueError, match="is the working directory or holds it"), atomic_directory(where):
            pass
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(tmp_path / "new"):
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _snapshot_versions(tmp_path: Path) -> tuple[Path, dict, dict]:
    target = tmp_path / "d"
    with atomic_directory(target) as staging:
        _write_version(staging, "old")
    (target / "notes.txt").write_text("keep me")
    old = _visible(target)
    new = {**old, "config.json": b'{"version": "new"}', "weights.bin": b"new" * 1000}
    return target, old, new


def _restore_old(target: Path) -> None:
    with atomic_directory(target, keep=lambda name: True) as staging:
        _write_version(staging, "old")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_directory_every_fault(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    target, old, new = _snapshot_versions(tmp_path)

    def run():
        with atomic_directory(target, keep=lambda name: True) as staging:
            _write_version(staging, "new")

    def check(n, error):
        # A failure after the swap (deleting the old copy, fsyncing the parent) raises with the new version in place.
        assert _visible(target) in ((old, new) if error else (new,)), f"step {n}: {error}"

    with fsync_counted(monkeypatch):
        steps = every_fault(run, check, reset=lambda: _restore_old(target))
    assert steps >= 10


@pytest.mark.skipif(sys.platform != "linux", reason="fork + SIGKILL of the writer")
def test_atomic_directory_killed_at_every_step(tmp_path, monkeypatch):
    target, old, new = _snapshot_versions(tmp_path)

    def run():
        with atomic_directory(target, keep=lambda name: True) as staging:
            _write_version(staging, "new")

    finished = []

    def check(n, status):
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0), (n, status)
        seen = _visible(target)
        assert seen in (old, new), f"killed at step {n}: {seen.keys()}"
        if seen == new:
            finished.append(n)
        if seen == new and not killed:
            return
        _restore_old(target)  # for the next round (a kill after the swap leaves the new version)

    with fsync_counted(monkeypatch):
        steps = every_fault(run, lambda n, e: None, reset=lambda: _restore_old(target))
        _restore_old(target)
        every_kill(run, check, steps)
    assert finished and min(finished) > 1  # the new version appears only once the swap happened


def test_read_together_never_mixes_versions(tmp_path):
    target = tmp_path / "d"
    with atomic_directory(target) as staging:
        _write_version(staging, "v0")
    stop = threading.Event()
    errors = []

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            with atomic_directory(target) as staging:
                _write_version(staging, f"v{i % 2}")

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(300):
            files = read_together(target, ["config.json", "weights.bin", "absent"])
            version = files["config.json"].decode().split('"')[3]
            if files["weights.bin"] != version.encode() * 1000 or files["absent"] is not None:
                errors.append(version)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    with pytest.raises(FileNotFoundError):
        read_together(tmp_path / "missing", ["a"])


def test_benchmark_report_writes_atomically(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO))
    import benchmarks

    importlib.reload(benchmarks)  # its __init__ takes the repository root off sys.path (also if imported before)
    from benchmarks import report

    assert str(REPO) not in sys.path
    committed = REPO / "benchmarks" / "results" / "cpu"  # a real run's records and facts
    facts = json.loads((committed / "run.json").read_text())
    rows = json.loads((committed / "quantize.json").read_text())[:3]
    out, clean = tmp_path / "out", tmp_path / "clean"
    report.write(rows, facts, out)
    old = _visible(out)
    assert {"quantize.json", "quantize.png", "run.json", "results.md"} <= set(old)
    newer = {**facts, "seconds": facts["seconds"] + 1}
    report.write(rows, newer, clean)
    new = _visible(clean)
    # Matplotlib's rendering is slow and not what is tested: from here on one small figure goes through the same
    # atomic PNG writer.
    figure = report.plt.figure(figsize=(1, 1))
    monkeypatch.setattr(report, "plot", lambda suite, records, path: report._save_figure(figure, path))
    report.write(rows, facts, out)
    report.write(rows, newer, clean)
    old, new = _visible(out), _visible(clean)
    assert new["run.json"] != old["run.json"]

    def check(n, error):
        now = _visible(out)
        assert now.keys() == old.keys(), n
        for name, content in now.items():  # every file whole: the old one or the new one, never torn
            assert content in (old[name], new[name]), (n, name)
        assert error is not None or now == new

    with fsync_counted(monkeypatch):
        every_fault(lambda: report.write(rows, newer, out), check, reset=lambda: report.write(rows, facts, out))
