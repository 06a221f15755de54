"""``python -m shmpool doctor`` end to end: a healthy machine, a small
/dev/shm, a name left by a dead owner."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys

import pytest

from shmpool import _doctor

DOCTOR = [sys.executable, "-m", "shmpool", "doctor"]


def _doctor_run(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *DOCTOR, *args], capture_output=True, text=True,
                          timeout=120)


def test_a_machine_that_can_run_a_pool_gives_0():
    done = _doctor_run("--capacity", "16M")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("a default Pool can run here")
    assert "FAIL" not in done.stdout
    for name in ("/dev/shm", "semaphore", "leftovers", "RemoveIPC", "THP shmem", "hugetlb",
                 "start methods"):
        assert f" {name} " in done.stdout


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare -m (a private "
                    "mount namespace); the capacity test below covers the same check")
def test_a_16_mb_dev_shm_fails_with_the_shm_size_hint():
    # A private mount namespace: the 16 MB tmpfs hides /dev/shm for this
    # command only, and goes with it.
    script = ("mount -t tmpfs -o size=16m tmpfs /dev/shm && exec "
              + " ".join(map(_quote, DOCTOR)))
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("FAIL  /dev/shm")]
    assert "tmpfs of 16 MiB" in line and "--shm-size=256m" in line


def _quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


def test_a_capacity_beyond_free_space_fails_with_the_shm_size_hint():
    st = os.statvfs("/dev/shm")
    beyond = st.f_bavail * st.f_frsize + (1 << 30)
    done = _doctor_run("--capacity", str(beyond))
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("FAIL  /dev/shm")]
    assert "--shm-size=" in line


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_name_left_by_a_dead_owner_is_reported_and_kept():
    # Another shmpool process on this machine may sweep the name between our
    # creating it and the doctor's reading it (any new store sweeps dead
    # owners' names): then try again with a new one.
    for _ in range(5):
        name = f"shmp_{_dead_pid()}_{secrets.token_hex(8)}"
        path = os.path.join("/dev/shm", name)
        with open(path, "xb"):
            pass
        try:
            check = _doctor.leftover_names()
            still_there = os.path.exists(path)
        finally:
            if os.path.exists(path):
                os.unlink(path)
        if still_there:
            break
    else:
        pytest.skip("every name made for the test was swept by another process at once")
    assert check.status == _doctor.WARN
    assert name in check.detail and "is gone" in check.detail
    assert f"rm /dev/shm/{name}" in check.fix or " ..." in check.fix
