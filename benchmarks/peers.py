"""Every library the suite compares, behind one interface.

A *pool peer* runs tasks::

    peer = SomePeer(workers, ray)      # ray: the run's RayRuntime (or None)
    peer.start()                       # workers up, a first trivial task answered
    peer.map(fn, items, chunksize)     # -> list, in order
    peer.apply_async(fn, items)        # submit one task per item, then get them all
    peer.apply(fn, arg)                # one task, waited for
    peer.chain(first, arg, fn, n)      # first(arg), then fn(previous) n - 1 times
    peer.stop()

``ops`` names the operations a peer has (joblib has no ``apply_async``).
A *queue peer* makes queues and starts the processes that use them
(``queue()``, ``spawn(target, *args)``, ``join(handle)``).  ``available()``
says why a peer cannot run (a library not installed), or None.

Peers are listed in ``POOL_PEERS`` and ``QUEUE_PEERS``, shmpool's first
(``EXTRA_PEERS`` run only when named); the first peer of each kind whose key is in ``REFERENCE`` is what ratios are
taken against.
"""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
import time

import numpy as np

from . import tasks

GIB = 1024**3
BENCH_EXTRA = "pip install -e '.[bench]'"
RAY_STORE_BYTES = 3 * GIB           #: Ray's object store: room for W1's 512 MiB twice over
RAY_INLINE_LIMIT = 100 * 1024       #: Ray passes arguments under this by value anyway


def _missing(*modules: str) -> str | None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({BENCH_EXTRA})"
    return None


class RayRuntime:
    """The one Ray instance of a run: started before the Ray peers, with a
    bounded object store, and shut down at the end.  ``num_cpus`` is the
    largest worker count of the run; a Ray-tasks peer with fewer workers
    asks ``num_cpus / workers`` CPUs per task, so at most ``workers`` of its
    tasks run at once."""

    def __init__(self, num_cpus: int, store_bytes: int = RAY_STORE_BYTES) -> None:
        self.num_cpus = num_cpus
        self.store_bytes = store_bytes
        self.running = False

    def start(self) -> float:
        """Seconds from ``ray.init`` to a running local instance."""
        import ray
        begin = time.perf_counter()
        ray.init(address="local", num_cpus=self.num_cpus,
                 object_store_memory=self.store_bytes, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.ERROR)
        self.running = True
        return time.perf_counter() - begin

    def stop(self) -> float | None:
        if not self.running:
            return None
        import ray
        begin = time.perf_counter()
        ray.shutdown()
        self.running = False
        return time.perf_counter() - begin


class Peer:
    """A library under test, with *workers* worker processes."""

    key = ""                      #: short name, for --peers and the JSON file
    label = ""                    #: what the tables show
    family = ""                   #: shmpool, multiprocessing, joblib, ray
    kind = "pool"                 #: pool or queue
    ops = frozenset({"map", "apply_async", "apply"})
    note = ""                     #: how it is configured, for the report
    requires: tuple = ()          #: modules it needs (from the [bench] extra)

    def __init__(self, workers: int, ray: RayRuntime | None = None) -> None:
        self.workers = workers
        self.ray = ray

    @classmethod
    def available(cls) -> str | None:
        """Why this peer cannot run here, or None if it can."""
        return _missing(*cls.requires)

    @classmethod
    def unsupported(cls, workers: int) -> str | None:
        """Why this peer has no comparable figure with *workers*, or None."""
        return None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    @classmethod
    def finish(cls) -> None:
        """Once, after every peer of this class has stopped: what the
        library keeps for the whole process (loky's executor)."""

    def chain(self, first, arg, fn, stages: int):
        x = self.apply(first, arg)
        for _ in range(stages - 1):
            x = self.apply(fn, x)
        return x


class _Pooled(Peer):
    """A peer around one pool object, made by ``_make()``."""

    pool = None

    def _make(self):
        raise NotImplementedError

    def start(self) -> None:
        self.pool = self._make()
        self.apply(tasks.noop, 0)


# -- pools with the multiprocessing.Pool API --------------------------------

class _PoolAPI(_Pooled):
    def map(self, fn, items, chunksize: int) -> list:
        return self.pool.map(fn, items, chunksize)

    def apply_async(self, fn, items) -> list:
        pending = [self.pool.apply_async(fn, (x,)) for x in items]
        return [r.get() for r in pending]

    def apply(self, fn, arg):
        return self.pool.apply(fn, (arg,))

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None


class ShmpoolPool(_PoolAPI):
    key, label, family = "shmpool", "shmpool.Pool", "shmpool"
    ops = _PoolAPI.ops | {"pressure"}
    note = "fork"

    def _make(self):
        import shmpool
        return shmpool.get_context("fork").Pool(self.workers)

    def pressure(self, fn, items, chunksize: int) -> list:
        """W10's map: on this pool's store, which has room for every result."""
        return self.map(fn, items, chunksize)


class ShmpoolSmallStore(ShmpoolPool):
    """W10 only: a store with room for a quarter of W1's first size (the
    results past it go in-band, each at once: none could be freed)."""

    key, label, family = "shmpool-small-store", "shmpool.Pool, 64 MiB store", "shmpool-store"
    ops = frozenset({"pressure"})
    note = "fork; capacity=64 MiB"
    CAPACITY = 64 * 1024 * 1024

    def _make(self):
        import shmpool
        return shmpool.get_context("fork").Pool(self.workers, capacity=self.CAPACITY)

    def pressure(self, fn, items, chunksize: int) -> list:
        import warnings

        import shmpool
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", shmpool.StoreFullWarning)
            return self.map(fn, items, chunksize)


class ShmpoolReadonlyPool(ShmpoolPool):
    key, label = "shmpool-readonly", "shmpool.Pool (readonly=True)"
    note = "fork; sealed read-only views instead of copy-on-write"

    def _make(self):
        import shmpool
        return shmpool.get_context("fork").Pool(self.workers, readonly=True)


class MultiprocessingFork(_PoolAPI):
    key, label, family = "mp-fork", "multiprocessing.Pool (fork)", "multiprocessing"
    note = "fork"

    def _make(self):
        return multiprocessing.get_context(self.note).Pool(self.workers)


class MultiprocessingSpawn(MultiprocessingFork):
    key, label = "mp-spawn", "multiprocessing.Pool (spawn)"
    note = "spawn"


class RayPool(_PoolAPI):
    key, label, family = "ray-pool", "ray.util.multiprocessing.Pool", "ray"
    note = "one actor per worker"

    requires = ("ray",)

    def _make(self):
        from ray.util.multiprocessing import Pool
        return Pool(processes=self.workers)


# -- executors ---------------------------------------------------------------

class _ExecutorAPI(_Pooled):
    def map(self, fn, items, chunksize: int) -> list:
        return list(self.pool.map(fn, items, chunksize=chunksize))

    def apply_async(self, fn, items) -> list:
        pending = [self.pool.submit(fn, x) for x in items]
        return [f.result() for f in pending]

    def apply(self, fn, arg):
        return self.pool.submit(fn, arg).result()

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


class ShmpoolExecutor(_ExecutorAPI):
    key, label, family = "shmpool-executor", "shmpool.ProcessPoolExecutor", "shmpool"
    note = "fork"

    @classmethod
    def available(cls) -> str | None:
        try:
            from shmpool import ProcessPoolExecutor  # noqa: F401
        except ImportError:
            return "not available yet: this shmpool has no ProcessPoolExecutor"
        return None

    def _make(self):
        from shmpool import ProcessPoolExecutor
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"))


class StdlibExecutor(_ExecutorAPI):
    key, label, family = ("cf-executor", "concurrent.futures.ProcessPoolExecutor",
                          "multiprocessing")
    note = "fork"

    def _make(self):
        import concurrent.futures
        return concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("fork"))


# -- joblib ------------------------------------------------------------------

class Joblib(Peer):
    key, label, family = "joblib", "joblib Parallel (loky)", "joblib"
    ops = frozenset({"map", "apply"})
    note = "batch_size='auto'; arguments over max_nbytes (1 MB) memory-mapped"

    parallel = None

    requires = ("joblib",)

    @classmethod
    def unsupported(cls, workers: int) -> str | None:
        if workers == 1:
            return "joblib runs n_jobs=1 in the calling process, with no worker"
        return None

    def start(self) -> None:
        from joblib import Parallel
        # Entered once and reused for every call, as joblib advises for many calls.
        self.parallel = Parallel(n_jobs=self.workers, backend="loky")
        self.parallel.__enter__()
        self.apply(tasks.noop, 0)

    def map(self, fn, items, chunksize: int) -> list:
        from joblib import delayed
        return self.parallel(delayed(fn)(x) for x in items)

    def apply(self, fn, arg):
        from joblib import delayed
        return self.parallel([delayed(fn)(arg)])[0]

    def stop(self) -> None:
        if self.parallel is not None:
            self.parallel.__exit__(None, None, None)
            self.parallel = None

    @classmethod
    def finish(cls) -> None:
        # loky keeps one executor per process for the next Parallel; there is none.
        from joblib.externals.loky import get_reusable_executor
        get_reusable_executor().shutdown(wait=True)


# -- Ray tasks ---------------------------------------------------------------

class RayTasks(Peer):
    key, label, family = "ray-tasks", "Ray tasks (ray.put / f.remote / ray.get)", "ray"
    note = "array arguments ray.put; a chain passes ObjectRefs"

    requires = ("ray",)

    def start(self) -> None:
        import ray
        share = self.ray.num_cpus / self.workers
        self._call = ray.remote(tasks.call).options(num_cpus=share)
        self._chunk = ray.remote(tasks.map_chunk).options(num_cpus=share)
        self.apply(tasks.noop, 0)

    def _arg(self, x):
        import ray
        if isinstance(x, np.ndarray) and x.nbytes >= RAY_INLINE_LIMIT:
            return ray.put(x)
        return x

    def map(self, fn, items, chunksize: int) -> list:
        import ray
        if chunksize == 1:
            return self.apply_async(fn, items)
        items = list(items)
        parts = [self._chunk.remote(fn, items[i:i + chunksize])
                 for i in range(0, len(items), chunksize)]
        return [y for part in ray.get(parts) for y in part]

    def apply_async(self, fn, items) -> list:
        import ray
        return ray.get([self._call.remote(fn, self._arg(x)) for x in items])

    def apply(self, fn, arg):
        import ray
        return ray.get(self._call.remote(fn, self._arg(arg)))

    def chain(self, first, arg, fn, stages: int):
        import ray
        ref = self._call.remote(first, arg)
        for _ in range(stages - 1):
            ref = self._call.remote(fn, ref)        # the ref, not the array
        return ray.get(ref)

    def stop(self) -> None:
        pass


# -- queues ------------------------------------------------------------------

class _ForkQueues(Peer):
    kind = "queue"
    ops = frozenset({"queue"})
    note = "fork"
    queue_class = "Queue"          #: the class of the context: Queue or SimpleQueue

    def start(self) -> None:
        self.ctx = multiprocessing.get_context("fork")

    def spawn(self, target, *args):
        process = self.ctx.Process(target=target, args=args, daemon=True)
        process.start()
        return process

    def join(self, process) -> None:
        process.join()

    def close(self, q) -> None:
        q.close()
        if hasattr(q, "join_thread"):  # a SimpleQueue has no feeder thread
            q.join_thread()

    def stop(self) -> None:
        pass


class ShmpoolQueue(_ForkQueues):
    key, label, family = "shmpool-queue", "shmpool.Queue", "shmpool"

    def queue(self):
        import shmpool
        return getattr(shmpool.get_context("fork"), self.queue_class)()


class ShmpoolReadonlyQueue(ShmpoolQueue):
    key, label = "shmpool-queue-readonly", "shmpool.Queue (readonly=True)"

    def queue(self):
        import shmpool
        return getattr(shmpool.get_context("fork"), self.queue_class)(readonly=True)


class MultiprocessingQueue(_ForkQueues):
    key, label, family = "mp-queue", "multiprocessing.Queue", "multiprocessing"

    def queue(self):
        return getattr(self.ctx, self.queue_class)()


class ShmpoolSimpleQueue(ShmpoolQueue):
    key, label, queue_class = "shmpool-simplequeue", "shmpool.SimpleQueue", "SimpleQueue"


class MultiprocessingSimpleQueue(MultiprocessingQueue):
    key, label, queue_class = "mp-simplequeue", "multiprocessing.SimpleQueue", "SimpleQueue"


class RayQueue(Peer):
    key, label, family = "ray-queue", "ray.util.queue.Queue", "ray"
    kind = "queue"
    ops = frozenset({"queue"})
    note = "an actor; the other end is a Ray task"

    requires = ("ray",)

    def start(self) -> None:
        import ray
        self._remote = ray.remote(tasks.call).options(num_cpus=self.ray.num_cpus / self.workers)

    def queue(self):
        from ray.util.queue import Queue
        return Queue()

    def spawn(self, target, *args):
        return self._remote.remote(target, *args)

    def join(self, ref) -> None:
        import ray
        ray.get(ref)

    def close(self, q) -> None:
        q.shutdown()

    def stop(self) -> None:
        pass


POOL_PEERS = (ShmpoolPool, ShmpoolExecutor, MultiprocessingFork, MultiprocessingSpawn,
              StdlibExecutor, Joblib, RayPool, RayTasks, ShmpoolSmallStore)
QUEUE_PEERS = (ShmpoolQueue, MultiprocessingQueue, RayQueue)
DEFAULT_PEERS = POOL_PEERS + QUEUE_PEERS           #: what a run measures without --peers
#: Only when asked for (``bench_queue.py`` compares them).
#: ``--readonly`` adds these, to compare with the copy-on-write default.
READONLY_PEERS = (ShmpoolReadonlyPool, ShmpoolReadonlyQueue)
EXTRA_PEERS = (ShmpoolSimpleQueue, MultiprocessingSimpleQueue) + READONLY_PEERS
ALL_PEERS = DEFAULT_PEERS + EXTRA_PEERS
REFERENCE = {"pool": "mp-fork", "queue": "mp-queue"}    #: ratios are "× faster than" these
