"""``python -m shmpool doctor`` end to end: a healthy machine, a small
/dev/shm, a name left by a dead owner.

Where the tests may (root, ``unshare -m``), the doctor runs in a private
mount namespace with a tmpfs of our choosing on /dev/shm: the size is what
the test says, and nothing another process on the machine does there
reaches it.  Elsewhere the same checks
run against the real /dev/shm.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import sys

import pytest

from shmpool import _doctor

DOCTOR = [sys.executable, "-m", "shmpool", "doctor"]


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


PRIVATE = _can_unshare()
needs_private = pytest.mark.skipif(not PRIVATE, reason="needs root and unshare -m (a private "
                                   "mount namespace); the tests on the real /dev/shm cover "
                                   "the same checks")


def _doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DOCTOR, *args], capture_output=True, text=True, timeout=120)


def _doctor_on_private_dev_shm(size: str, *args: str, leave: str = "") -> \
        subprocess.CompletedProcess:
    """The doctor with a *size* tmpfs on /dev/shm, holding the file *leave*."""
    script = f"mount -t tmpfs -o size={size} tmpfs /dev/shm"
    if leave:
        script += f" && touch /dev/shm/{shlex.quote(leave)}"
    script += " && exec " + shlex.join([*DOCTOR, *args])
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                          text=True, timeout=120)


def _fail_line(stdout: str) -> str:
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("FAIL  /dev/shm")]
    return line


def _assert_healthy(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("a default Pool can run here")
    assert "FAIL" not in done.stdout
    for name in ("/dev/shm", "segment", "semaphore", "leftovers", "RemoveIPC", "THP shmem", "hugetlb",
                 "start methods"):
        assert f" {name} " in done.stdout


@needs_private
def test_a_clean_machine_gives_0():
    _assert_healthy(_doctor_on_private_dev_shm("512m"))


def test_this_machine_gives_0_for_a_small_store():
    _assert_healthy(_doctor("--capacity", "16M"))


@needs_private
def test_a_16_mb_dev_shm_fails_with_the_shm_size_hint():
    done = _doctor_on_private_dev_shm("16m")
    assert done.returncode == 1, done.stdout + done.stderr
    line = _fail_line(done.stdout)
    assert "tmpfs of 16 MiB" in line and "--shm-size=256m" in line
    assert done.stdout.rstrip().endswith("see the fix on each line")


def test_a_capacity_beyond_free_space_fails_with_the_shm_size_hint():
    st = os.statvfs("/dev/shm")
    beyond = st.f_bavail * st.f_frsize + (1 << 30)
    done = _doctor("--capacity", str(beyond))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "--shm-size=" in _fail_line(done.stdout)


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@needs_private
def test_a_name_left_by_a_dead_owner_is_reported():
    name = f"shmp_{_dead_pid()}_{secrets.token_hex(8)}"
    done = _doctor_on_private_dev_shm("512m", leave=name)
    assert done.returncode == 0, done.stdout + done.stderr      # a warning, not a failure
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("warn  leftovers")]
    assert f"{name} (pid" in line and "is gone" in line and f"rm /dev/shm/{name}" in line


@pytest.mark.skipif(PRIVATE, reason="done in a private /dev/shm above")
def test_a_name_left_by_a_dead_owner_is_reported_on_the_real_dev_shm():
    name = f"shmp_{_dead_pid()}_{secrets.token_hex(8)}"
    path = os.path.join("/dev/shm", name)
    with open(path, "xb"):
        pass
    try:
        check = _doctor.leftover_names()
    finally:
        os.unlink(path)
    assert check.status == _doctor.WARN
    assert name in check.detail and "is gone" in check.detail


def test_the_demos_help_names_the_doctor():
    done = subprocess.run([sys.executable, "-m", "shmpool", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.startswith("python -m shmpool doctor")
    assert "usage: python -m shmpool [-h]" in done.stdout
