"""Nothing is left in /dev/shm, however the owner of a store ends."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

import shmpool
from shmpool import testing

from conftest import DEADLOCK_TIMEOUT

pytestmark = pytest.mark.crash

OWNER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import shmpool
    from shmpool import testing

    store = shmpool.ObjectStore(64 << 20)
    ref = store.put(np.ones(1 << 20))
    view = store.get(ref)
    print(" ".join(sorted(testing.names_in_use([os.getpid()]))), flush=True)
    how = sys.argv[1]
    if how == "close":
        store.close()
    elif how == "exception":
        raise RuntimeError("the owner fails")
    elif how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    # "exit": leave without closing anything
""")

GROUP = textwrap.dedent("""
    import multiprocessing, os, sys
    import numpy as np
    import shmpool

    # Pipes, not multiprocessing.Event: a killed group takes the resource
    # tracker with it, so named stdlib semaphores would be left behind.
    def reader(store, ref, conn):
        view = store.get(ref)
        conn.send("attached")
        conn.recv()                             # block until killed

    if __name__ == "__main__":
        ctx = multiprocessing.get_context(sys.argv[1])
        store = shmpool.ObjectStore(64 << 20)
        ref = store.put(np.ones(1 << 20))
        here, there = ctx.Pipe()
        child = ctx.Process(target=reader, args=(store, ref, there))
        child.start()
        if not here.poll(60) or here.recv() != "attached":
            sys.exit("the reader never attached")
        print("ready", flush=True)
        sys.stdin.read()                        # block until killed
""")


def _run_owner(how):
    proc = subprocess.run([sys.executable, "-c", OWNER, how], capture_output=True,
                          text=True, timeout=DEADLOCK_TIMEOUT)
    return proc, proc.stdout.split()


@pytest.mark.parametrize("how", ["close", "exit", "exception", "sigkill"])
def test_owner_leaves_nothing_behind(how):
    before = testing.live_names()
    proc, names = _run_owner(how)
    expected_rc = {"close": 0, "exit": 0, "exception": 1, "sigkill": -signal.SIGKILL}[how]
    assert proc.returncode == expected_rc, proc.stderr
    # While it lived, the store had no name at all: the segment never has
    # one and is passed by descriptor; the lock lives inside the segment.
    assert names == [], names
    assert not testing.leaked_names(since=before, timeout=10.0)


def _open_segments() -> dict[str, os.stat_result]:
    """The shared-memory files this process has open, by /proc link text."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith(("/dev/shm/", "/memfd:")):
                found[link] = os.stat(f"/proc/self/fd/{fd}")
        except OSError:
            pass                                   # closed meanwhile
    return found


def test_a_store_has_no_name_and_only_its_user_can_open_it():
    before_names, before_segments = testing.names_in_use([os.getpid()]), _open_segments()
    with shmpool.ObjectStore(64 << 20):
        new = {link: st for link, st in _open_segments().items()
               if link not in before_segments}
        assert not testing.names_in_use([os.getpid()]) - before_names
    assert len(new) == 1, new
    (link, st), = new.items()
    assert st.st_nlink == 0, f"{link} has a name"
    assert stat.S_IMODE(st.st_mode) == 0o600


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_sigkill_of_whole_process_group_leaves_nothing(method, tmp_path):
    script = tmp_path / "group.py"           # a file: spawn children import it
    script.write_text(GROUP)
    before = testing.live_names()
    proc = subprocess.Popen([sys.executable, str(script), method], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)             # owner, reader and tracker
        proc.wait(DEADLOCK_TIMEOUT)
        proc.stdout.close()
        proc.stdin.close()
    # Every process that could clean up is dead (the resource tracker is in
    # the group too), and nothing was left to clean up: no start-up sweep.
    assert not testing.leaked_names(since=before, timeout=10.0)


def test_attached_reader_keeps_working_after_owner_is_killed(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent("""
        import multiprocessing, os, signal, sys
        import numpy as np
        import shmpool

        def reader(store, ref, ready, go, out):
            view = store.get(ref)
            ready.set()
            go.wait(60)
            out.put(float(view.sum()))

        if __name__ == "__main__":
            ctx = multiprocessing.get_context("spawn")
            store = shmpool.ObjectStore(64 << 20)
            ref = store.put(np.ones(1000))
            ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
            child = ctx.Process(target=reader, args=(store, ref, ready, go, out))
            child.start()
            if not ready.wait(60):
                sys.exit("the reader never attached")
            # Kill the owner's memory: close the store, then die hard.
            store.close()
            del ref
            go.set()
            print(out.get(timeout=60), flush=True)
            child.join(60)
            os.kill(os.getpid(), signal.SIGKILL)
    """))
    before = testing.live_names()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=DEADLOCK_TIMEOUT)
    assert proc.stdout.strip() == "1000.0", proc.stderr
    assert not testing.leaked_names(since=before, timeout=10.0)


POOL_OWNER = textwrap.dedent("""
    import multiprocessing, sys, time
    import numpy as np
    import shmpool

    def work(i):
        return np.full(1 << 18, float(i))

    if __name__ == "__main__":
        pool = shmpool.Pool(2, context=multiprocessing.get_context(sys.argv[1]))
        results = pool.map(work, range(8))
        print(" ".join(map(str, pool.statistics().worker_pids)), flush=True)
        pending = pool.map_async(work, range(10 ** 6))
        sys.stdin.read()                        # block until killed
""")


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_pool_parent_killed_mid_run_leaves_no_worker_and_no_name(method, tmp_path):
    script = tmp_path / "pool_owner.py"
    script.write_text(POOL_OWNER)
    before = testing.live_names()
    proc = subprocess.Popen([sys.executable, str(script), method], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(workers) == 2
    finally:
        proc.kill()                              # SIGKILL the parent mid-map
        proc.wait(DEADLOCK_TIMEOUT)
        proc.stdout.close()
        proc.stdin.close()
    deadline = time.monotonic() + DEADLOCK_TIMEOUT / 4
    while any(_posix_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)                         # polling other processes' exit
    assert not [pid for pid in workers if _posix_alive(pid)], "workers outlived their parent"
    assert not testing.leaked_names(since=before, timeout=10.0)


def _posix_alive(pid: int) -> bool:
    from shmpool import _posix
    return _posix.process_is_alive(pid)
