"""Fault injection for crash-safety tests: fail the n-th file operation of a call, for every n.

File operations are seen through Python's audit hooks (``open``, ``os.rename`` (also ``os.replace``),
``os.link``, ``os.remove``, ``os.rmdir``, ``os.mkdir``, ``os.chmod``, ``os.symlink``, ``shutil.rmtree``,
``shutil.copyfile``) plus ``os.fsync`` and the ``renameat2`` exchange, which raise no audit event and are
wrapped (:func:`fsync_counted`), and any function a test wraps with :meth:`FaultPlan.wrap` (e.g. safetensors'
Rust writer).

At the chosen operation the plan either raises :class:`InjectedFault` (the operation does not happen) or,
with ``kill=True``, sends SIGKILL to its own process (run that in a forked child).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from contextlib import contextmanager

EVENTS = frozenset(
    {
        "open",
        "os.rename",
        "os.link",
        "os.remove",
        "os.rmdir",
        "os.mkdir",
        "os.chmod",
        "os.symlink",
        "shutil.rmtree",
        "shutil.copyfile",
    }
)


class InjectedFault(OSError):
    """The failure a :class:`FaultPlan` injects (an OSError, as a full disk or an I/O error would be)."""


class FaultPlan:
    """Counts file operations while armed; the ``fail_at``-th one fails (1-based; 0: none fails)."""

    def __init__(self) -> None:
        self.armed = False
        self.fail_at = 0
        self.kill = False
        self.count = 0
        self.log: list[str] = []

    def step(self, what: str) -> None:
        if not self.armed:
            return
        self.count += 1
        self.log.append(what)
        if self.count == self.fail_at:
            self.armed = False
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise InjectedFault(f"injected failure at file operation {self.count}: {what}")

    def wrap(self, fn: Callable, name: str) -> Callable:
        """``fn`` preceded by a step (so its own failure is one of the injected ones)."""

        def wrapped(*args, **kwargs):
            self.step(name)
            return fn(*args, **kwargs)

        return wrapped

    @contextmanager
    def armed_at(self, fail_at: int, kill: bool = False):
        self.fail_at, self.kill, self.count, self.log = fail_at, kill, 0, []
        self.armed = True
        try:
            yield self
        finally:
            self.armed = False


PLAN = FaultPlan()
_real_fsync = os.fsync


def _hook(event: str, args: tuple) -> None:
    if PLAN.armed and event in EVENTS:
        PLAN.step(f"{event}{args[:2]!r}")


def _fsync(fd: int) -> None:
    PLAN.step("os.fsync")
    _real_fsync(fd)


sys.addaudithook(_hook)  # audit hooks cannot be removed; disarmed it only checks a flag


@contextmanager
def fsync_counted(monkeypatch):
    """Also count the file operations no audit event reports: ``os.fsync`` and the ``renameat2`` exchange of
    :mod:`fastllm._atomic` (a ctypes call, which raises no audit event)."""
    from fastllm import _atomic

    monkeypatch.setattr(os, "fsync", _fsync)
    monkeypatch.setattr(_atomic, "_exchange", PLAN.wrap(_atomic._exchange, "renameat2(RENAME_EXCHANGE)"))
    yield


def every_fault(
    run: Callable[[], object],
    check: Callable[[int, BaseException | None], None],
    reset: Callable[[], None] | None = None,
) -> int:
    """Run ``run`` once per file operation it performs, failing that operation; ``check(n, error)`` after each.

    ``error`` is the InjectedFault that escaped, or None where ``run`` finished (the last round, which fails
    nothing, or one where the code tolerated the failure, e.g. ``mkdir(exist_ok=True)``); after such a round
    ``reset()`` restores the starting state. Returns the number of operations of a clean run.
    """
    n = 1
    while True:
        error = None
        with PLAN.armed_at(n):
            try:
                run()
            except InjectedFault as exc:
                error = exc
            fired = PLAN.count >= n
        check(n, error)
        if not fired:
            return n - 1
        if error is None and reset is not None:
            reset()
        n += 1
        assert n < 10_000, "the call never finishes"


def every_kill(run: Callable[[], object], check: Callable[[int, int], None], steps: int) -> None:
    """For n in 1..steps: fork, run ``run`` in the child with SIGKILL at its n-th operation, ``check(n, status)``.

    ``status`` is the child's wait status (killed by SIGKILL unless it finished first).
    """
    for n in range(1, steps + 1):
        pid = os.fork()
        if pid == 0:  # child: never returns into the test
            code = 0
            try:
                with PLAN.armed_at(n, kill=True):
                    run()
            except BaseException:
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        check(n, status)
