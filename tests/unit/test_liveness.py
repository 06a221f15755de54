"""The liveness primitive: a byte locked through a private description."""

import os

from shmpool import _liveness


def _file() -> int:
    fd = os.memfd_create("liveness-test")
    os.ftruncate(fd, 4096)
    return fd


def test_a_held_byte_is_seen_from_other_descriptions_only():
    fd = _file()
    mine, other = _liveness.open_private(fd), _liveness.open_private(fd)
    try:
        assert _liveness.try_hold(mine, 100)
        assert _liveness.is_held(other, 100)
        assert not _liveness.is_held(mine, 100)      # own locks never conflict
        assert not _liveness.try_hold(other, 100)
        assert not _liveness.is_held(other, 101)
    finally:
        os.close(mine)
    assert not _liveness.is_held(other, 100)          # closing drops the lock
    os.close(other)
    os.close(fd)


def test_a_dup_shares_the_lock_and_keeps_it_alive():
    fd = _file()
    mine, other = _liveness.open_private(fd), _liveness.open_private(fd)
    assert _liveness.try_hold(mine, 7)
    copy = os.dup(mine)
    os.close(mine)
    assert _liveness.is_held(other, 7)                # the copy still holds it
    os.close(copy)
    assert not _liveness.is_held(other, 7)
    os.close(other)
    os.close(fd)


def test_private_descriptions_are_closed_on_exec():
    fd = _file()
    mine = _liveness.open_private(fd)
    assert not os.get_inheritable(mine)
    os.close(mine)
    os.close(fd)
