"""One run of the suite: start the peers, measure each figure on them, stop
them, and collect every number (``python -m benchmarks`` and each per-area
``bench_*.py`` script run through here)."""

from __future__ import annotations

import argparse
import datetime
import time

from . import limits, peers, system, targets, workloads
from .measure import describe, measure
from .progress import Progress

REPEATS, QUICK_REPEATS = 5, 3
FIGURE_TIMEOUT = 900.0           #: seconds before a figure counts as hung


class Session:
    """The peers of a run, started on first need and stopped at the end.

    Peers are started per *slot*: the run's worker count, and each worker
    count of W7, which gets pools of its own (stopped right after its
    figure), so that no library (loky resizes one executor for all) runs a
    figure with pools that another worker count has changed.  Peers that do
    not fork (Ray's) start after the others, so that no pool forks a
    process that already runs Ray's threads."""

    def __init__(self, classes: list, ray: peers.RayRuntime | None, progress: Progress) -> None:
        self.classes = sorted(classes, key=lambda c: c.family == "ray")
        self.ray = ray
        self.progress = progress
        self.started: dict[tuple, list] = {}
        self.failed: dict[tuple, str] = {}
        self.lifecycle: list[dict] = []

    def peers(self, slot: tuple) -> list:
        """The started peers of *slot*, ``(workers, name)``."""
        if slot not in self.started:
            self.started[slot] = []
            for cls in self.classes:
                if cls.family == "ray" and not self.ray.running:
                    self._start_ray()
                self._start(cls, slot)
        return [peer for peer, _ in self.started[slot]]

    def _start_ray(self) -> None:
        self.progress.step("starting Ray", 1)
        self.lifecycle.append({"key": "ray-runtime", "label": "Ray runtime (ray.init)",
                               "workers": self.ray.num_cpus, "startup_s": self.ray.start()})

    def _start(self, cls, slot: tuple) -> None:
        workers = slot[0]
        peer = cls(workers, self.ray)
        self.progress.step(f"starting · {cls.key} ({workers} workers)", 1)
        begin = time.perf_counter()
        try:
            peer.start()
        except Exception as exc:                       # noqa: BLE001 - reported
            self.failed[cls.key, slot] = f"did not start: {describe(exc)}"
            return
        row = {"key": cls.key, "label": cls.label, "workers": workers,
               "startup_s": time.perf_counter() - begin}
        if cls.kind == "pool":
            self.lifecycle.append(row)
        self.started[slot].append((peer, row))

    def stop(self, slot: tuple) -> None:
        for peer, row in reversed(self.started.pop(slot, [])):
            begin = time.perf_counter()
            try:
                peer.stop()
                row["shutdown_s"] = time.perf_counter() - begin
            except Exception as exc:                   # noqa: BLE001 - reported
                row["shutdown_error"] = describe(exc)

    def close(self) -> None:
        for slot in list(self.started):
            self.stop(slot)
        for cls in self.classes:
            cls.finish()
        if self.ray is not None and self.ray.running:
            seconds = self.ray.stop()
            for row in self.lifecycle:
                if row["key"] == "ray-runtime":
                    row["shutdown_s"] = seconds


def slot_of(fig, workers: int) -> tuple:
    """Which pools serve *fig*: W7's worker counts each have their own."""
    return (fig.workers, "W7") if fig.workers else (workers, "")


def sizes(quick: bool) -> workloads.Sizes:
    return workloads.QUICK if quick else workloads.FULL


def run(args: argparse.Namespace, command: str, chosen: list | None = None) -> dict:
    """Measure *chosen* (default: the figures of ``args.only``, or all) on the
    peers of ``args.peers`` (default: ``peers.DEFAULT_PEERS``); the results
    as ``report`` and ``targets`` read them.  *command* is what the report
    says was run."""
    repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)
    if chosen is None:
        chosen = [f for f in workloads.figures(sizes(args.quick))
                  if not args.only or f.group in args.only]
    kinds = {f.kind for f in chosen}
    classes = [c for c in (peers.ALL_PEERS if args.peers else peers.DEFAULT_PEERS)
               if c.kind in kinds and (not args.peers or c.key in args.peers)]
    reasons = {c.key: c.available() for c in classes}
    usable = [c for c in classes if reasons[c.key] is None]
    slots = {slot_of(f, args.workers) for f in chosen}
    ray = (peers.RayRuntime(max(w for w, _ in slots))
           if any(c.family == "ray" for c in usable) else None)

    def runs_of(fig) -> int:
        return sum(fig.kind == c.kind and fig.op in c.ops for c in usable) * (repeats + 1)

    w1 = [(f.extra["count"], f.extra["nbytes"]) for f in chosen if f.group == "W1"]
    total = (3 + len(w1)) * (repeats + 1) + sum(map(runs_of, chosen)) \
        + len(usable) * len(slots) + (ray is not None)
    progress = Progress(total)
    snapshot = system.Snapshot.take()
    began, load_start = time.monotonic(), system.load()
    results = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick, "repeats": repeats, "workers": args.workers,
        "machine": system.machine(), "versions": system.versions(),
        "reference": dict(peers.REFERENCE),
        "peers": {c.key: {"label": c.label, "family": c.family, "kind": c.kind,
                          "note": c.note, "available": reasons[c.key] is None,
                          "reason": reasons[c.key]} for c in classes},
    }
    results["limits"] = limits.measure(w1, repeats, progress.step)
    session = Session(usable, ray, progress)
    last_use = {slot_of(f, args.workers): i for i, f in enumerate(chosen)}
    figures = []
    try:
        for i, fig in enumerate(chosen):
            slot = slot_of(fig, args.workers)
            started = session.peers(slot)
            cells = {}
            for cls in usable:
                if cls.kind != fig.kind:
                    continue
                if (cls.key, slot) in session.failed:
                    cells[cls.key] = {"error": session.failed[cls.key, slot]}
                elif fig.op not in cls.ops:
                    cells[cls.key] = {"skipped": f"no {fig.op} in {cls.label}"}
                elif why := cls.unsupported(slot[0]):
                    cells[cls.key] = {"skipped": why}
            chosen_peers = [p for p in started if p.kind == fig.kind and fig.op in p.ops
                            and p.key not in cells]
            measured = measure(fig, chosen_peers, repeats,
                               lambda name, n, fig=fig: progress.step(f"{fig.group} "
                                                                      f"{fig.label} · {name}", n),
                               args.timeout)
            order = [c.key for c in usable if c.key in cells or c.key in measured]
            merged = {**cells, **measured}
            figures.append({"key": fig.key, "group": fig.group, "label": fig.label,
                            "kind": fig.kind, "op": fig.op, "payload_bytes": fig.payload_bytes,
                            "per": fig.per, "workers": slot[0], "held_bytes": fig.held_bytes,
                            "extra": fig.extra, "peers": {k: merged[k] for k in order}})
            if last_use[slot] == i and slot[1]:
                session.stop(slot)
    finally:
        session.close()
        progress.close()
    results["figures"] = figures
    results["lifecycle"] = session.lifecycle
    results["load"] = {"start": load_start, "end": system.load()}
    results["duration_s"] = time.monotonic() - began
    results["problems"] = system.leftovers(snapshot)
    results["targets"] = targets.check(results)
    return results
