"""The doctor's checks, each fed a machine of our making (no children)."""

from __future__ import annotations

import argparse
import os

import pytest

from shmpool import _doctor
from shmpool._doctor import FAIL, INFO, OK, WARN, Check


@pytest.mark.parametrize("text, nbytes", [
    ("268435456", 256 << 20), ("256M", 256 << 20), ("256MiB", 256 << 20),
    ("1g", 1 << 30), ("1.5G", 3 << 29), ("64k", 64 << 10),
])
def test_parse_size(text, nbytes):
    assert _doctor.parse_size(text) == nbytes


def test_parse_size_refuses_words():
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        _doctor.parse_size("lots")


@pytest.mark.parametrize("nbytes, flag", [
    (1, "1m"), (16 << 20, "16m"), (200 << 20, "256m"), (1 << 30, "1g"), (3 << 30, "4g"),
])
def test_docker_size_rounds_up_to_a_power_of_two(nbytes, flag):
    assert _doctor.docker_size(nbytes) == flag


def test_capacity_beyond_free_space_fails_with_the_shm_size_hint():
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    check = _doctor.shm_space(free + (1 << 30))
    assert check.status == FAIL
    assert "--shm-size=" in check.fix
    assert "less than" in check.detail


def test_capacity_that_fits_is_ok():
    assert _doctor.shm_space(1 << 20).status in (OK, WARN)   # WARN: low on memory


def test_missing_dev_shm_fails(tmp_path):
    check = _doctor.shm_space(1 << 20, shm_dir=str(tmp_path / "absent"))
    assert check.status == FAIL and "mount -t tmpfs" in check.fix


@pytest.mark.parametrize("files, headroom", [
    ({}, None),
    ({"memory.max": "max\n", "memory.current": "100\n"}, None),
    ({"memory.max": "1000\n", "memory.current": "100\n"}, 900),
    ({"memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),
    ({"memory/memory.limit_in_bytes": "5000\n", "memory/memory.usage_in_bytes": "1000\n"},
     4000),
])
def test_cgroup_memory_headroom(tmp_path, files, headroom):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    found = _doctor.cgroup_memory_headroom(str(tmp_path), str(tmp_path / "no-such-file"))
    assert (found and found[0]) == headroom


def test_a_store_beyond_the_memory_limit_warns(tmp_path):
    (tmp_path / "memory.max").write_text(f"{8 << 20}\n")
    (tmp_path / "memory.current").write_text("0\n")
    check = _doctor.shm_space(16 << 20, cgroup_root=str(tmp_path))
    assert check.status == WARN and "memory limit" in check.detail
    assert "--memory" in check.fix


def test_container_is_recognised(tmp_path):
    assert _doctor.in_container(str(tmp_path)) is None
    (tmp_path / ".dockerenv").touch()
    assert _doctor.in_container(str(tmp_path)) == "Docker"


def _logind(tmp_path, main: str, *dropins: tuple[str, str]):
    conf = tmp_path / "logind.conf"
    conf.write_text(main)
    folder = tmp_path / "logind.conf.d"
    folder.mkdir()
    for name, text in dropins:
        (folder / name).write_text(text)
    return str(conf), [str(folder)]


def test_remove_ipc_defaults_to_yes_and_warns_a_regular_user(tmp_path):
    conf, dirs = _logind(tmp_path, "[Login]\n#RemoveIPC=yes\n")
    check = _doctor.logind_remove_ipc(conf, dirs, systemd_running=True, uid=1000)
    assert check.status == WARN
    assert "systemd's default" in check.detail and "stores own none" in check.detail
    assert "RemoveIPC=no" in check.fix and "enable-linger" in check.fix


def test_remove_ipc_last_drop_in_wins(tmp_path):
    conf, dirs = _logind(tmp_path, "[Login]\nRemoveIPC=yes\n",
                         ("50-a.conf", "[Login]\nRemoveIPC=no\n"),
                         ("10-b.conf", "[Login]\nRemoveIPC=yes\n"))
    check = _doctor.logind_remove_ipc(conf, dirs, systemd_running=True, uid=1000)
    assert check.status == OK and "50-a.conf" in check.detail


def test_remove_ipc_spares_system_users_and_machines_without_systemd(tmp_path):
    conf, dirs = _logind(tmp_path, "[Login]\nRemoveIPC=yes\n")
    assert _doctor.logind_remove_ipc(conf, dirs, systemd_running=True, uid=0).status == OK
    assert _doctor.logind_remove_ipc(conf, dirs, systemd_running=False, uid=1000).status == OK


def test_shmem_huge_page_mode_is_read(tmp_path):
    path = tmp_path / "shmem_enabled"
    path.write_text("always within_size advise [never] deny force\n")
    check = _doctor.shmem_huge_pages(str(path))
    assert check.status == INFO and check.detail.startswith("never")
    assert "echo advise" in check.fix
    path.write_text("always within_size [advise] never deny force\n")
    assert _doctor.shmem_huge_pages(str(path)).fix == ""


def test_hugetlb_pages_are_read(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text("MemTotal: 100 kB\nHugePages_Total:      8\nHugePages_Free:       6\n"
                    "Hugepagesize:       2048 kB\n")
    assert "8 pages of 2 MiB reserved, 6 free" in _doctor.hugetlb_pages(str(path)).detail


def test_report_exit_status_follows_fail_lines():
    text, status = _doctor.report([Check("a", OK, "fine"), Check("b", WARN, "hm", "do x")])
    assert status == 0 and text.endswith("a default Pool can run here")
    assert "fix: do x" in text
    text, status = _doctor.report([Check("a", FAIL, "broken", "mend it")])
    assert status == 1 and "cannot run here" in text
