"""The goals the suite checks, against the numbers of one run.

Ratios are of medians measured side by side: another library's median over
shmpool's (above 1: shmpool is faster).  Against Ray, the faster of Ray's
peers is taken.  The pool goals are checked for every shmpool pool that
ran (``shmpool.Pool``, and ``shmpool.ProcessPoolExecutor`` where it exists);
the queue goals for ``shmpool.Queue``.

| workload | goal |
|:---|:---|
| W1, W2 | at least 20× faster than multiprocessing.Pool, 4× faster than Ray |
| W1 | within 2× of the machine's limit (the work plus one warm memcpy) |
| W3 | no slower than multiprocessing.Pool (at least 1×) |
| W4 throughput | at least 10× faster than multiprocessing.Queue, 4× than Ray's |
| W5 | anonymous growth under 5% of the bytes held |
| W6 | at least 30× faster than multiprocessing.Pool |
| W9 | no slower than joblib (at least 1×) |
| W10 | a 64 MiB store within 2× of a store with room for every result |
"""

from __future__ import annotations

from . import limits as limits_
from . import peers as peers_

FASTER = {"W1": (20.0, 4.0), "W2": (20.0, 4.0), "W3": (1.0, None), "W6": (30.0, None)}
QUEUE_FASTER = (10.0, 4.0)
JOBLIB_FASTER = {"W9": 1.0}
PRESSURE_MULTIPLE = 2.0
LIMIT_MULTIPLE = 2.0
ANON_FRACTION = 0.05


def median(cell: dict | None, metric: str = "seconds") -> float | None:
    if not cell or metric not in cell:
        return None
    return cell[metric]["median"]


def _faster(fig: dict, peers: dict, mine: str, others: list[str], goal: float,
            versus: str) -> dict:
    own = median(fig["peers"].get(mine))
    theirs = [t for t in (median(fig["peers"].get(k)) for k in others) if t is not None]
    row = {"figure": fig["label"], "group": fig["group"], "peer": peers[mine]["label"],
           "goal": f"≥ {goal:g}× faster than {versus}", "threshold": goal}
    if own is None or not theirs:
        return {**row, "value": None, "met": None, "shown": "not measured"}
    ratio = min(theirs) / own
    return {**row, "value": ratio, "met": ratio >= goal, "shown": f"{ratio:.3g}×"}


def _label(peers: dict, key: str) -> str:
    """A peer's label, also when this run left it out."""
    if key in peers:
        return peers[key]["label"]
    return next(c.label for c in peers_.ALL_PEERS if c.key == key)


def check(results: dict) -> list[dict]:
    peers = results["peers"]
    ran = {k for k, p in peers.items() if p.get("available")}
    pools = [k for k, p in peers.items()
             if k in ran and p["family"] == "shmpool" and p["kind"] == "pool"]
    joblib = [k for k, p in peers.items() if p["family"] == "joblib"]
    ray_pools = [k for k, p in peers.items() if p["family"] == "ray" and p["kind"] == "pool"]
    ray_queues = [k for k, p in peers.items() if p["family"] == "ray" and p["kind"] == "queue"]
    mp_label = _label(peers, "mp-fork")
    found = []
    for fig in results["figures"]:
        group = fig["group"]
        if group in FASTER:
            versus_mp, versus_ray = FASTER[group]
            for mine in pools:
                found.append(_faster(fig, peers, mine, ["mp-fork"], versus_mp, mp_label))
                if versus_ray:
                    found.append(_faster(fig, peers, mine, ray_pools, versus_ray, "Ray"))
        if group == "W1":
            found += [_within_limit(fig, peers, mine, results) for mine in pools]
        if group == "W4" and fig["payload_bytes"] and "shmpool-queue" in ran:
            found.append(_faster(fig, peers, "shmpool-queue", ["mp-queue"], QUEUE_FASTER[0],
                                 _label(peers, "mp-queue")))
            found.append(_faster(fig, peers, "shmpool-queue", ray_queues, QUEUE_FASTER[1],
                                 "Ray's queue"))
        if group == "W5":
            found += [_anonymous_growth(fig, peers, mine) for mine in pools]
        if group in JOBLIB_FASTER:
            found += [_faster(fig, peers, mine, joblib, JOBLIB_FASTER[group], "joblib")
                      for mine in pools]
        if group == "W10" and "shmpool" in ran:
            found.append(_pressure(fig, peers))
    return found


def _pressure(fig: dict, peers: dict) -> dict:
    row = {"figure": fig["label"], "group": fig["group"],
           "peer": _label(peers, "shmpool-small-store"),
           "goal": f"≤ {PRESSURE_MULTIPLE:g}× the time with a store that holds every result",
           "threshold": PRESSURE_MULTIPLE}
    small, big = (median(fig["peers"].get(k)) for k in ("shmpool-small-store", "shmpool"))
    if small is None or big is None:
        return {**row, "value": None, "met": None, "shown": "not measured"}
    multiple = small / big
    return {**row, "value": multiple, "met": multiple <= PRESSURE_MULTIPLE,
            "shown": f"{multiple:.3g}× ({small:.3g} s vs {big:.3g} s)"}


def _within_limit(fig: dict, peers: dict, mine: str, results: dict) -> dict:
    row = {"figure": fig["label"], "group": fig["group"], "peer": peers[mine]["label"],
           "goal": f"≤ {LIMIT_MULTIPLE:g}× the machine's limit (work + one warm memcpy)",
           "threshold": LIMIT_MULTIPLE}
    own = median(fig["peers"].get(mine))
    limit = limits_.w1_limit(results["limits"], fig["extra"]["count"], fig["extra"]["nbytes"],
                             results["workers"])
    if own is None or not limit:
        return {**row, "value": None, "met": None, "shown": "not measured"}
    multiple = own / limit
    return {**row, "value": multiple, "met": multiple <= LIMIT_MULTIPLE,
            "shown": f"{multiple:.3g}× the limit ({own:.3g} s vs {limit:.3g} s)"}


def _anonymous_growth(fig: dict, peers: dict, mine: str) -> dict:
    row = {"figure": fig["label"], "group": fig["group"], "peer": peers[mine]["label"],
           "goal": f"anonymous growth < {ANON_FRACTION:.0%} of the bytes held",
           "threshold": ANON_FRACTION}
    anon = median(fig["peers"].get(mine), "anon_bytes")
    if anon is None:
        return {**row, "value": None, "met": None, "shown": "not measured"}
    fraction = anon / fig["held_bytes"]
    return {**row, "value": fraction, "met": fraction < ANON_FRACTION,
            "shown": f"{fraction:.1%} ({anon / 2**20:.1f} MiB of {fig['held_bytes'] // 2**20} MiB)"}
