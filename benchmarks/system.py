"""What the report says about the run itself: the machine, the versions,
the load, the parent's memory, and what the run left behind."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import multiprocessing
import os
import platform
import re
from dataclasses import dataclass

from shmpool import testing

DEV_SHM = "/dev/shm"
LIBRARIES = ("shmpool", "numpy", "joblib", "ray", "matplotlib")


@dataclass(frozen=True)
class Rss:
    """Resident bytes of this process by kind (``/proc/self/status``)."""

    anon: int      #: private anonymous pages: the heap, malloc's mmaps
    shmem: int     #: shared memory pages mapped and touched by this process


def rss() -> Rss:
    with open("/proc/self/status", encoding="ascii") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    kib = {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssShmem")}
    return Rss(kib["RssAnon"], kib["RssShmem"])


def malloc_trim() -> None:
    """Give freed heap memory back to the kernel (glibc), so that what an
    earlier run freed is not counted in or out of the next one's growth."""
    name = ctypes.util.find_library("c")
    if name:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
            model = match.group(1).strip() if match else ""
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": model or platform.processor(), "cpus": os.cpu_count(),
            "memory_bytes": memory, "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


@dataclass(frozen=True)
class Snapshot:
    """What existed before the run, to tell its leftovers from others'."""

    dev_shm: set
    children: set     # processes started before the run (a forkserver, ...)

    @classmethod
    def take(cls) -> "Snapshot":
        return cls(testing.live_names(), set(_children()))


def _children() -> list[int]:
    """Live processes whose parent is this one (Ray's and loky's included)."""
    me, found = str(os.getpid()), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue                    # gone meanwhile
        if fields.get("PPid", "").strip() != me or fields.get("State", "").strip()[:1] == "Z":
            continue
        if not _is_resource_tracker(entry):
            found.append(int(entry))
    return found


def _is_resource_tracker(pid: str) -> bool:
    """multiprocessing's (and loky's) resource tracker: one per parent, by
    design alive until the parent exits."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker import main" in f.read()
    except OSError:
        return False


def _has_files(folder: str) -> bool:
    try:
        return bool(os.listdir(folder))
    except OSError:
        return False                    # removed meanwhile


def leftovers(before: Snapshot) -> list[str]:
    """Processes and shared-memory names this run left behind."""
    found = []
    children = sorted(({c.pid for c in multiprocessing.active_children()} | set(_children()))
                      - before.children)
    if children:
        found.append(f"child processes still alive: {children}")
    leaked = testing.leaked_names(since=before.dev_shm, timeout=5.0)
    if leaked:
        found.append(f"names nobody uses left in {DEV_SHM}: {sorted(leaked)}")
    # joblib removes its (by then empty) folders at exit: files in them are leftovers.
    mine = [n for n in testing.live_names() - before.dev_shm
            if n.startswith("joblib_memmapping_folder_") and f"_{os.getpid()}_" in n
            and _has_files(os.path.join(DEV_SHM, n))]
    if mine:
        found.append(f"joblib files left in {DEV_SHM}: {sorted(mine)}")
    return found
