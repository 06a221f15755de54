"""The measuring rules every figure follows.

For one figure, each peer opens a *session* (its queues, its child
process: not timed) that hands back ``run()``, one timed run returning its
metrics (``{"seconds": ...}``, and for some figures more).  Every peer does
one warm-up run, then ``repeats`` timed runs; the peers take turns run
after run, in an order that rotates by one each round, so that a noisy
moment of a shared machine hits them alike.  Reported per metric: the
median, the min and max, and the samples.  A peer that fails (an
exception, a wrong answer) is reported with its error and leaves the
rotation; the others go on.  A figure that takes longer than *timeout*
seconds counts as hung: every thread's traceback is dumped and the process
exits.
"""

from __future__ import annotations

import contextlib
import faulthandler
import statistics
from typing import Callable


class WrongAnswer(RuntimeError):
    """A peer's run gave a wrong answer: its time would not be comparable."""


def check(ok: bool, what: str) -> None:
    if not ok:
        raise WrongAnswer(what)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "samples": list(values)}


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:300]


def in_turns(runs: dict[str, Callable[[], dict]], repeats: int,
             on_step: Callable[[str, int], None],
             errors: dict[str, str]) -> dict[str, dict]:
    """Warm up each of *runs*, then time *repeats* rounds in rotating order.

    Returns ``{name: {metric: summary}}`` for the runs that never failed;
    *errors* gets ``{name: message}`` for the others.  ``on_step(name, 1)``
    is called before each run, and ``on_step(name, n)`` for the *n* runs a
    failed one will not do (the progress bar counts them)."""
    runs = dict(runs)
    samples: dict[str, list[dict]] = {name: [] for name in runs}
    for round_ in range(-1, repeats):                 # round -1: the warm-up
        names = list(runs)
        shift = round_ % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            on_step(name, 1)
            try:
                metrics = runs[name]()
            except Exception as exc:                  # noqa: BLE001 - reported, not hidden
                errors[name] = describe(exc)
                del runs[name]
                samples.pop(name)
                on_step(name, repeats - round_ - 1)   # the runs it will not do
                continue
            if round_ >= 0:
                samples[name].append(metrics)
    return {name: {metric: summary([s[metric] for s in got]) for metric in got[0]}
            for name, got in samples.items() if got}


def repeat_in_turns(runs: dict[str, Callable[[], dict]], repeats: int,
                    on_step: Callable[[str, int], None] = lambda name, n: None,
                    what: str = "measuring") -> dict[str, dict]:
    """:func:`in_turns` where every run must succeed: the first failure
    raises RuntimeError naming it."""
    errors: dict[str, str] = {}
    found = in_turns(runs, repeats, on_step, errors)
    if errors:
        raise RuntimeError(f"{what} failed: {errors}")
    return found


@contextlib.contextmanager
def _guarded(session, name: str, errors: dict[str, str]):
    """Enter *session*; an error on the way out is recorded, not raised."""
    run = session.__enter__()
    try:
        yield run
    finally:
        try:
            session.__exit__(None, None, None)
        except Exception as exc:                      # noqa: BLE001 - reported
            errors.setdefault(name, f"on closing: {describe(exc)}")


def measure(figure, peers: list, repeats: int, on_step, timeout: float) -> dict:
    """Time *figure* on *peers*: ``{peer key: {metric: summary} or {"error": msg}}``."""
    errors: dict[str, str] = {}
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        with contextlib.ExitStack() as stack:
            runs = {}
            for peer in peers:
                try:
                    runs[peer.key] = stack.enter_context(
                        _guarded(figure.session(peer), peer.key, errors))
                except Exception as exc:              # noqa: BLE001 - reported
                    errors[peer.key] = f"on opening: {describe(exc)}"
            found = in_turns(runs, repeats, on_step, errors)
    finally:
        faulthandler.cancel_dump_traceback_later()
    for key, message in errors.items():
        found[key] = {"error": message}
    return found
