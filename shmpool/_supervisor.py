"""Parent side of the worker processes: dispatch, answers, deaths.

::

    caller threads --submit()--> queue --+--> worker pipe 1 --> worker 1 --+
                                         +--> worker pipe n --> worker n --+
    on_answer(job, index, status, payload) <-- supervisor thread <---------+
                                              (answers, sentinels, wake-up)

Each worker has its own duplex pipe and at most one task in flight, so the
supervisor always knows which tasks a worker holds.  ``submit`` hands a task
straight to an idle worker from the calling thread (no thread hop on the
way in); otherwise it waits in the queue until a worker answers.

The one supervisor thread waits on every worker pipe, every worker's
sentinel and a wake-up pipe.  When a worker dies (any signal, ``os._exit``,
the OOM killer), its task fails at once with WorkerDiedError naming the pid
and signal, the task's arguments are released, the dead worker's holds in
the store are reaped, and a new worker takes its place.  Nothing waits for
a dead process.

Thread-safety: all state below is guarded by ``_lock``; answers are handed
to ``on_answer`` outside it.
"""

from __future__ import annotations

import collections
import enum
import os
import threading
from multiprocessing.connection import wait

from ._errors import BrokenPoolError, WorkerDiedError
from ._serialization import ObjectStore
from ._worker import ACK, HEADER, STOP, run_worker

__all__ = ["Supervisor", "State"]


class State(enum.Enum):
    RUNNING = "running"
    CLOSING = "closing"           # no new tasks; finish the queue, then stop workers
    TERMINATING = "terminating"   # kill workers now
    STOPPED = "stopped"


class _Worker:
    __slots__ = ("process", "conn", "task", "tasks_left", "retiring")

    def __init__(self, process, conn, tasks_left: int | None) -> None:
        self.process = process
        self.conn = conn
        self.task = None              # (job, index, held ref) in flight, or None
        self.tasks_left = tasks_left  # None: no limit (maxtasksperchild)
        self.retiring = False         # gets no more tasks


class Supervisor:
    """Runs *size* worker processes of *ctx* and feeds them tasks.

    Args:
        on_answer: ``on_answer(job, index, status, payload)`` for each task
            answered (status OK or ERROR, payload a store message), called in
            the supervisor thread.
        on_failure: ``on_failure(job, index, exception)`` for a task whose
            worker died or that could not be sent.
    """

    def __init__(self, ctx, store: ObjectStore, size: int, initializer, initargs,
                 maxtasks, on_answer, on_failure) -> None:
        self._ctx = ctx
        self._store = store
        self._worker_args = (initializer, initargs, maxtasks)
        self._on_answer = on_answer
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._queue: collections.deque = collections.deque()
        self._workers: dict[object, _Worker] = {}
        self._state = State.RUNNING
        self._wake_r, self._wake_w = os.pipe()
        for _ in range(size):
            self._spawn_locked()
        self._thread = threading.Thread(target=self._run, name="shmpool-supervisor",
                                        daemon=True)
        self._thread.start()

    # -- workers -----------------------------------------------------------

    def _spawn_locked(self) -> None:
        ours, theirs = self._ctx.Pipe()
        process = self._ctx.Process(
            target=run_worker, args=(theirs, self._store, *self._worker_args),
            name="shmpool-worker", daemon=True)
        process.start()
        theirs.close()
        self._workers[ours] = _Worker(process, ours, self._worker_args[2])

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._workers.values()]

    @property
    def state(self) -> State:
        return self._state

    # -- tasks -------------------------------------------------------------

    def submit(self, job: int, index: int, message: bytes, held) -> None:
        """Queue a task; *held* (an owning ref or None) is kept until the task
        ends.  Raises BrokenPoolError if the supervisor no longer runs."""
        with self._lock:
            if self._state is not State.RUNNING:
                raise BrokenPoolError(f"the pool is {self._state.value}; it takes no tasks")
            self._queue.append((job, index, message, held))
            self._dispatch_locked()

    def _dispatch_locked(self) -> None:
        for worker in self._workers.values():
            if not self._queue:
                return
            if worker.task is not None or worker.retiring:
                continue
            job, index, message, held = self._queue.popleft()
            worker.task = (job, index, held)
            if worker.tasks_left is not None:
                worker.tasks_left -= 1
                worker.retiring = worker.tasks_left == 0
            self._send(worker, message)

    # -- the supervisor thread ---------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._state is State.STOPPED or (
                        self._state is not State.RUNNING and not self._workers):
                    self._state = State.STOPPED
                    break
                by_sentinel = {w.process.sentinel: w for w in self._workers.values()}
                conns = list(self._workers)
            ready = wait([*conns, *by_sentinel, self._wake_r])
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            for conn in conns:
                if conn in ready:
                    self._drain(self._workers.get(conn))
            for sentinel, worker in by_sentinel.items():
                if sentinel in ready:
                    self._drain(worker)          # answers sent before it died
                    self._on_exit(worker)
            self._stop_idle_workers_if_closing()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _drain(self, worker: _Worker | None) -> None:
        while worker is not None:
            try:
                if not worker.conn.poll():
                    return
                message = worker.conn.recv_bytes()
            except (EOFError, OSError):
                return
            job, index, status = HEADER.unpack_from(message)
            payload = memoryview(message)[HEADER.size:]
            self._on_answer(job, index, status, payload)     # takes its own hold
            if self._store.is_held_message(payload):
                self._send(worker, ACK)                      # the worker lets go
            with self._lock:
                task, worker.task = worker.task, None
                self._dispatch_locked()
            if task is not None and task[2] is not None:
                self._store.release(task[2])                 # the task's arguments

    @staticmethod
    def _send(worker: _Worker, message: bytes) -> None:
        try:
            worker.conn.send_bytes(message)
        except OSError:
            pass          # it died: its sentinel says so shortly

    def _on_exit(self, worker: _Worker) -> None:
        worker.process.join()
        with self._lock:
            self._workers.pop(worker.conn, None)
            task, worker.task = worker.task, None
        worker.conn.close()
        self._store.raw.reap_dead_processes()    # its views, its unsealed objects
        if task is not None:
            job, index, held = task
            if held is not None:
                self._store.release(held)
            if self._state is State.TERMINATING:
                error = BrokenPoolError("the pool was terminated before the task finished")
            else:
                error = WorkerDiedError(worker.process.pid, worker.process.exitcode)
            self._on_failure(job, index, error)
        with self._lock:
            if self._state is State.RUNNING or (self._state is State.CLOSING and self._queue):
                self._spawn_locked()
            self._dispatch_locked()

    def _stop_idle_workers_if_closing(self) -> None:
        with self._lock:
            if self._state is not State.CLOSING or self._queue:
                return
            for worker in self._workers.values():
                if worker.task is None and not worker.retiring:
                    worker.retiring = True
                    self._send(worker, STOP)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # -- shutdown ----------------------------------------------------------

    def close(self) -> None:
        """Take no new tasks; stop each worker once the queue is done."""
        with self._lock:
            if self._state is State.RUNNING:
                self._state = State.CLOSING
        self._wake()

    def terminate(self) -> None:
        """Kill every worker now; queued and running tasks fail."""
        with self._lock:
            if self._state is State.STOPPED:
                return
            self._state = State.TERMINATING
            queued, self._queue = list(self._queue), collections.deque()
            workers = list(self._workers.values())
        for worker in workers:
            worker.process.terminate()
        for job, index, _, held in queued:
            if held is not None:
                self._store.release(held)
            self._on_failure(job, index, BrokenPoolError("the pool was terminated"))
        self._wake()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the supervisor thread (and so every worker) to end."""
        self._thread.join(timeout)
