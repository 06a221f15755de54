"""``python -m shmpool doctor``: can this machine run shmpool, and if not, why.

What users of shared-memory libraries run into first is the machine, not
the library: a container's 64 MB ``/dev/shm`` (Docker's default, moby#2606),
systemd-logind deleting a user's POSIX names when the last session ends
(``RemoveIPC=yes``), names left by killed processes, a start method that
cannot start a process.  Each check reads the machine and prints one line::

    ok    /dev/shm        tmpfs of 23.5 GiB, 23.4 GiB free: a 256 MiB store fits
    FAIL  /dev/shm        tmpfs of 16 MiB, 16 MiB free: ...  fix: ... docker run --shm-size=256m ...

The exit status is 0 when a default Pool can run (no ``FAIL`` line), 1
otherwise.  The doctor only reads: it never removes a name, and it creates
nothing but one nameless segment and one semaphore (both gone at once) and
trivial child processes.

A store itself owns no name in ``/dev/shm`` (its segment is a nameless file,
its lock lives inside it), so what the doctor reports of names concerns
``multiprocessing``'s own semaphores and names left by earlier versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import multiprocessing
import os
import re
import sys
from typing import Any, Callable, Iterable, Sequence

from . import _posix
from ._arena import COMMIT_CHUNK

__all__ = ["Check", "DEFAULT_CAPACITY", "main", "run_checks"]

MIB = 1024 * 1024
GIB = 1024 * MIB
#: The store size the doctor checks for when no ``--capacity`` is given:
#: room for a default Pool moving a few 64 MiB arrays at once (the README's
#: workloads).  A store's default capacity is all of ``/dev/shm``'s free
#: space, so a smaller ``/dev/shm`` still starts, and fails on the first
#: large value instead.
DEFAULT_CAPACITY = 256 * MIB
#: Docker's default size of a container's ``/dev/shm``.
DOCKER_DEFAULT_SHM = 64 * MIB
#: Seconds a trivial child may take to start and exit before its start
#: method counts as not working (a spawned child imports shmpool, numpy
#: included, before it runs anything).
START_TIMEOUT = 20.0
#: Where systemd-logind reads its configuration, later files overriding
#: earlier ones (logind.conf(5)); drop-ins are read in file-name order.
LOGIND_CONF = "/etc/systemd/logind.conf"
LOGIND_DROPIN_DIRS = ("/usr/lib/systemd/logind.conf.d", "/usr/local/lib/systemd/logind.conf.d",
                      "/run/systemd/logind.conf.d", "/etc/systemd/logind.conf.d")
THP_SHMEM = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
MEMINFO = "/proc/meminfo"

OK, INFO, WARN, FAIL = "ok", "info", "warn", "FAIL"


@dataclasses.dataclass(frozen=True)
class Check:
    """The result of one check: one line of the report."""

    name: str          #: what was checked, e.g. "/dev/shm"
    status: str        #: ok, info, warn or FAIL; only FAIL makes the exit status 1
    detail: str        #: what was found
    fix: str = ""      #: what to do about it (for warn and FAIL)

    def line(self) -> str:
        text = f"{self.status:5} {self.name:15} {self.detail}"
        return f"{text}  fix: {self.fix}" if self.fix else text


# -- sizes ---------------------------------------------------------------------

_UNITS = {"": 1, "k": 1024, "m": MIB, "g": GIB, "t": 1024 * GIB}


def parse_size(text: str) -> int:
    """``"268435456"``, ``"256M"``, ``"256MiB"``, ``"1g"`` -> bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 268435456, 256M or 1G)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def human(nbytes: float) -> str:
    """``256 MiB``, ``23.4 GiB``: one decimal unless the number is whole."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if nbytes == int(nbytes) else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def docker_size(nbytes: int) -> str:
    """*nbytes* rounded up to a power of two MiB, as ``--shm-size`` spells it."""
    mib = 1 << max(0, (max(nbytes, 1) - 1) // MIB).bit_length()
    return f"{mib // 1024}g" if mib >= 1024 else f"{mib}m"


# -- where are we ----------------------------------------------------------------

def in_container(root: str = "/") -> str | None:
    """What says this process runs in a container, or None."""
    for marker, what in ((".dockerenv", "Docker"), ("run/.containerenv", "Podman")):
        if os.path.exists(os.path.join(root, marker)):
            return what
    try:
        with open(os.path.join(root, "proc/1/cgroup"), encoding="utf-8") as f:
            cgroup = f.read()
    except OSError:
        cgroup = ""
    for word, what in (("kubepods", "Kubernetes"), ("docker", "Docker"),
                       ("containerd", "containerd"), ("lxc", "LXC")):
        if word in cgroup:
            return what
    return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _mount_type(path: str, mounts: str = "/proc/self/mounts") -> str | None:
    """The file-system type mounted at *path* (the last mount wins)."""
    found = None
    for line in (_read(mounts) or "").splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == path:
            found = fields[2]
    return found


def _mem_available(meminfo: str = MEMINFO) -> int | None:
    fields = _meminfo(meminfo)
    return fields["MemAvailable"] * 1024 if "MemAvailable" in fields else None


#: A cgroup v1 memory limit at or above this means "no limit" (the kernel
#: reports a page-rounded 2**63 - 1).
_NO_LIMIT = 1 << 60


def cgroup_memory_headroom(cgroup_root: str = "/sys/fs/cgroup",
                           self_cgroup: str = "/proc/self/cgroup") -> tuple[int, str] | None:
    """Bytes this process's memory cgroup may still use, and the file that
    says so; None without a limit.  Shared-memory pages count against it:
    a store larger than the headroom gets the container OOM-killed."""
    v2_path = next((line[3:].strip() for line in (_read(self_cgroup) or "").splitlines()
                    if line.startswith("0::")), "/")
    for folder in dict.fromkeys([os.path.join(cgroup_root, v2_path.lstrip("/")), cgroup_root]):
        limit = (_read(os.path.join(folder, "memory.max")) or "").strip()
        if limit.isdigit():
            used = (_read(os.path.join(folder, "memory.current")) or "0").strip()
            return int(limit) - int(used or 0), os.path.join(folder, "memory.max")
    v1 = os.path.join(cgroup_root, "memory")
    limit = (_read(os.path.join(v1, "memory.limit_in_bytes")) or "").strip()
    if limit.isdigit() and int(limit) < _NO_LIMIT:
        used = (_read(os.path.join(v1, "memory.usage_in_bytes")) or "0").strip()
        return int(limit) - int(used or 0), os.path.join(v1, "memory.limit_in_bytes")
    return None


def _meminfo(path: str = MEMINFO) -> dict[str, int]:
    found = {}
    for line in (_read(path) or "").splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            found[key.strip()] = int(parts[0])
    return found


# -- the checks ------------------------------------------------------------------

def shm_space(capacity: int, shm_dir: str = _posix.SHM_DIR, root: str = "/",
              cgroup_root: str = "/sys/fs/cgroup") -> Check:
    """Size and free space of ``/dev/shm`` against *capacity*, and the
    memory that would back it."""
    name = shm_dir
    try:
        st = os.statvfs(shm_dir)
    except OSError as exc:
        return Check(name, FAIL, f"cannot read {shm_dir}: {exc.strerror}",
                     f"mount a tmpfs there: mount -t tmpfs -o size={docker_size(capacity)} "
                     f"tmpfs {shm_dir}")
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    used = total - st.f_bfree * st.f_frsize
    kind = _mount_type(shm_dir) or "not a mount point"
    detail = f"{kind} of {human(total)}, {human(free)} free"
    container = in_container(root)
    if total == DOCKER_DEFAULT_SHM:
        detail += " (64 MB: Docker's default for a container, moby#2606)"
    if free >= capacity and free >= COMMIT_CHUNK:
        headroom = cgroup_memory_headroom(cgroup_root, os.path.join(root, "proc/self/cgroup"))
        if headroom is not None and capacity > headroom[0]:
            return Check(name, WARN, f"{detail}: a {human(capacity)} store fits, but this "
                         f"process's memory limit ({headroom[1]}) leaves {human(headroom[0])}, "
                         f"and shared memory counts against it (beyond it: the OOM killer)",
                         "raise the container's memory limit (docker run --memory=...) or "
                         "pass a smaller capacity=")
        available = _mem_available()
        if available is not None and capacity > available:
            return Check(name, WARN, f"{detail}: a {human(capacity)} store fits, but only "
                         f"{human(available)} of memory is available to back it",
                         "ask for a smaller capacity= or free memory")
        return Check(name, OK, f"{detail}: a {human(capacity)} store fits")
    want = docker_size(used + capacity)
    detail += f": less than the {human(capacity)} store asked for (--capacity)"
    if container in ("Docker", "Podman", "containerd") or total == DOCKER_DEFAULT_SHM:
        fix = (f"start the container with a larger /dev/shm: docker run --shm-size={want} ... "
               f"(compose: shm_size: {want}; Kubernetes: an emptyDir with medium: Memory "
               f"mounted at {shm_dir})")
    elif container == "Kubernetes":
        fix = (f"mount an emptyDir volume with medium: Memory and sizeLimit: {want} at "
               f"{shm_dir} (or docker run --shm-size={want} outside Kubernetes)")
    else:
        fix = (f"free {shm_dir}, or grow it: mount -o remount,size={want} {shm_dir} "
               f"(in a container: docker run --shm-size={want})")
    return Check(name, FAIL, detail, fix)


def segment() -> Check:
    """Whether this process may create a store's nameless segment."""
    try:
        fd = _posix.create_segment(MIB)
    except Exception as exc:                       # noqa: BLE001 - reported
        return Check("segment", FAIL, f"cannot create a shared-memory segment: {exc}",
                     f"make {_posix.SHM_DIR} a writable tmpfs")
    os.close(fd)
    return Check("segment", OK, "a nameless shared-memory segment can be created")


def named_semaphore() -> Check:
    """Whether multiprocessing can make its named semaphores (the queues'
    counters, Lock, Event): sem_open creates them in /dev/shm."""
    try:
        # Under fork the standard library unlinks the name at once, and
        # starts no resource tracker.
        multiprocessing.get_context("fork").Lock()
    except Exception as exc:                       # noqa: BLE001 - reported
        return Check("semaphore", FAIL, f"cannot create a POSIX named semaphore: {exc}",
                     f"make {_posix.SHM_DIR} a writable tmpfs (sem_open creates sem.* there)")
    return Check("semaphore", OK, "a POSIX named semaphore can be created and removed")


def shmem_huge_pages(path: str = THP_SHMEM) -> Check:
    """The transparent-huge-page policy of shared memory (tmpfs, memfd)."""
    text = _read(path)
    if text is None:
        return Check("THP shmem", INFO, f"no {path}: this kernel has no transparent huge pages")
    m = re.search(r"\[(\w[\w-]*)\]", text)
    mode = m.group(1) if m else text.strip()
    meaning = {
        "always": "shared memory gets 2 MiB pages wherever it can",
        "within_size": "shared memory gets 2 MiB pages within the file's size",
        "advise": "shared memory gets 2 MiB pages where madvise(MADV_HUGEPAGE) asks",
        "never": "shared memory uses 4 KiB pages only: first touching a fresh store costs more",
        "deny": "huge pages are off for shared memory, even where asked",
        "force": "every shared mapping gets huge pages (a testing mode)",
    }.get(mode, "unknown mode")
    fix = f"as root: echo advise > {path}" if mode in ("never", "deny") else ""
    return Check("THP shmem", INFO, f"{mode}: {meaning}", fix)


def hugetlb_pages(path: str = MEMINFO) -> Check:
    """Reserved hugetlbfs pages (``HugePages_*`` of /proc/meminfo)."""
    fields = _meminfo(path)
    if "HugePages_Total" not in fields:
        return Check("hugetlb", INFO, f"no HugePages_* in {path}")
    total, free = fields["HugePages_Total"], fields.get("HugePages_Free", 0)
    size = fields.get("Hugepagesize", 0) * 1024
    if not total:
        return Check("hugetlb", INFO, f"no pages reserved (page size {human(size)})",
                     "to reserve some, as root: sysctl vm.nr_hugepages=<pages>")
    return Check("hugetlb", INFO, f"{total} pages of {human(size)} reserved, {free} free "
                 f"({human(free * size)})")


def logind_remove_ipc(conf: str = LOGIND_CONF,
                      dropin_dirs: Sequence[str] = LOGIND_DROPIN_DIRS,
                      systemd_running: bool | None = None,
                      uid: int | None = None) -> Check:
    """systemd-logind's ``RemoveIPC``: what it does to this user's names."""
    value, source = "yes", "systemd's default"
    dropins = sorted((p for d in dropin_dirs for p in glob.glob(os.path.join(d, "*.conf"))),
                     key=os.path.basename)
    for path in [conf, *dropins]:
        section = None
        for line in (_read(path) or "").splitlines():
            line = line.strip()
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
            elif section == "Login" and re.match(r"RemoveIPC\s*=", line):
                value, source = line.split("=", 1)[1].strip().lower(), path
    remove = value in ("yes", "true", "on", "1")
    if systemd_running is None:
        systemd_running = os.path.isdir("/run/systemd/system")
    uid = os.getuid() if uid is None else uid
    setting = f"RemoveIPC={'yes' if remove else 'no'} ({source})"
    if not remove:
        return Check("RemoveIPC", OK, f"{setting}: logind leaves POSIX names alone")
    if not systemd_running:
        return Check("RemoveIPC", OK, f"{setting}, but systemd does not run here: nothing "
                     "removes names when a session ends")
    if uid < _system_uid_max():
        return Check("RemoveIPC", OK, f"{setting}: not applied to uid {uid}, a system user")
    return Check("RemoveIPC", WARN,
                 f"{setting}: when uid {uid}'s last login session ends, logind deletes every "
                 f"file the user owns in {_posix.SHM_DIR}: stores own none, but the "
                 "multiprocessing semaphores of queues and locks made under spawn or "
                 "forkserver do, and programs still running then (under nohup, tmux "
                 "or cron) break on them",
                 "set RemoveIPC=no in /etc/systemd/logind.conf.d/shmpool.conf and restart "
                 "systemd-logind, or keep the user's session (loginctl enable-linger), "
                 "or run as a system user")


def _system_uid_max(login_defs: str = "/etc/login.defs") -> int:
    """Uids below this are system users, which RemoveIPC spares."""
    m = re.search(r"^\s*SYS_UID_MAX\s+(\d+)", _read(login_defs) or "", re.MULTILINE)
    return int(m.group(1)) + 1 if m else 1000


def leftover_names() -> Check:
    """Names earlier shmpool versions made in /dev/shm (this one makes
    none), and whether their owners live.  Report only."""
    names = sorted((name, _pid_in(name)) for name in _posix.shmpool_names())
    if not names:
        return Check("leftovers", OK, f"no shmpool names (shmp_*, sem.shmp_*) in "
                     f"{_posix.SHM_DIR}")
    dead = [(n, pid) for n, pid in names if not _posix.process_is_alive(pid)]
    live = len(names) - len(dead)
    alive = f"{live} of live processes (in use)" if live else ""
    if not dead:
        return Check("leftovers", OK, f"none left by a dead owner; {alive}")
    shown = ", ".join(f"{n} (pid {pid} is gone)" for n, pid in dead[:5])
    more = f" and {len(dead) - 5} more" if len(dead) > 5 else ""
    detail = f"{len(dead)} left by dead owners: {shown}{more}" + (f"; {alive}" if alive else "")
    return Check("leftovers", WARN, detail,
                 f"rm {' '.join(os.path.join(_posix.SHM_DIR, n) for n, _ in dead[:5])}"
                 + (" ..." if more else ""))


def _pid_in(name: str) -> int:
    """The owner pid in ``shmp_<pid>_<hex>`` or ``sem.shmp_<pid>_<hex>``."""
    return int(name.split("shmp_", 1)[1].split("_", 1)[0])


def _child() -> None:
    """What the start-method check runs in the child: nothing."""


def start_methods(timeout: float = START_TIMEOUT) -> Check:
    """Start a trivial process with each start method; FAIL if the default cannot."""
    default = multiprocessing.get_start_method(allow_none=True) or \
        multiprocessing.get_context().get_start_method()
    works: list[tuple[str, str | None]] = []
    broken: list[tuple[str, str | None]] = []
    for method in multiprocessing.get_all_start_methods():
        error = _try_start(method, timeout)
        (broken if error else works).append((method, error))
    listed = ", ".join(m for m, _ in works) or "none"
    if any(m == default for m, _ in broken):
        why = dict(broken)[default]
        return Check("start methods", FAIL, f"the default, {default}, does not work: {why}; "
                     f"working: {listed}",
                     f"pass context=shmpool.get_context('{works[0][0]}')" if works
                     else "check the process limits (ulimit -u) and the container's pids limit")
    if broken:
        failed = "; ".join(f"{m}: {why}" for m, why in broken)
        return Check("start methods", WARN, f"working: {listed} (default {default}); "
                     f"not working: {failed}", f"use one of: {listed}")
    return Check("start methods", OK, f"working: {listed} (default {default})")


def _try_start(method: str, timeout: float) -> str | None:
    """None if a trivial *method* child starts and exits 0 within *timeout*."""
    try:
        ctx: Any = multiprocessing.get_context(method)     # typeshed: BaseContext has no Process
        process = ctx.Process(target=_child, daemon=True)
        process.start()
    except Exception as exc:                        # noqa: BLE001 - reported
        return f"{type(exc).__name__}: {exc}"
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        return f"the child did not exit within {timeout:g} s"
    if process.exitcode != 0:
        return f"the child exited with {process.exitcode}"
    return None


def run_checks(capacity: int = DEFAULT_CAPACITY,
               start_timeout: float = START_TIMEOUT) -> list[Check]:
    """Every check, in the order they are printed."""
    checks: list[Callable[[], Check]] = [
        lambda: shm_space(capacity),
        segment,
        named_semaphore,
        leftover_names,
        logind_remove_ipc,
        shmem_huge_pages,
        hugetlb_pages,
        lambda: start_methods(start_timeout),
    ]
    return [check() for check in checks]


def report(checks: Iterable[Check]) -> tuple[str, int]:
    """The printed report and the exit status."""
    checks = list(checks)
    lines = [check.line() for check in checks]
    failed = [c for c in checks if c.status == FAIL]
    if failed:
        lines.append(f"a default Pool cannot run here: {len(failed)} check(s) failed "
                     f"({', '.join(c.name for c in failed)}); see the fix on each line")
    else:
        lines.append("a default Pool can run here")
    return "\n".join(lines), 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shmpool doctor",
        description="Check that this machine can run shmpool: /dev/shm, POSIX names, "
                    "systemd-logind, huge pages, start methods.  Exit status 0 when a "
                    "default Pool can run, 1 otherwise.  Reads only: removes nothing.")
    parser.add_argument("--capacity", type=parse_size, default=DEFAULT_CAPACITY,
                        metavar="BYTES",
                        help=f"the store size to check /dev/shm against (default "
                             f"{human(DEFAULT_CAPACITY)}; 256M, 1G and plain bytes work)")
    args = parser.parse_args(argv)
    text, status = report(run_checks(args.capacity))
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
