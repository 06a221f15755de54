"""Parent side of the worker processes: dispatch, answers, deaths.

::

    caller threads --submit()--> queue --+--> worker pipe 1 --> worker 1 --+
                                         +--> worker pipe n --> worker n --+
    on_answer(job, index, status, payload) <-- supervisor thread <---------+
                                              (answers, sentinels, wake-up)

Each worker has its own duplex pipe and at most *depth* tasks in flight:
the one it runs and the ones waiting in its pipe, so the supervisor always
knows which tasks a worker holds, and which of them it has started (only
the oldest).  ``submit`` hands a task straight to an idle worker from the
calling thread (no thread hop on the way in); when every worker is busy, it
goes into a busy worker's pipe (up to *depth*), so that the worker starts
it without waiting for the supervisor thread; otherwise it waits in the
queue until a worker answers.

The one supervisor thread waits on every worker pipe, every worker's
sentinel and a wake-up pipe.  When a worker dies (any signal, ``os._exit``,
the OOM killer), its task fails at once with WorkerDiedError naming the pid
and signal, the task's arguments are released, and the dead worker's holds
in the store are reaped.  Nothing waits for a dead process.  What happens
next is a choice of the front end:

- ``break_on_death=False`` (the Pool): a new worker takes its place and
  other tasks are unaffected;
- ``break_on_death=True`` (the executor, as ``concurrent.futures``): the
  supervisor is broken: every other worker is terminated, every task not
  yet answered fails with WorkerDiedError, and ``submit`` refuses new ones.

Options the executor needs, each harmless for the Pool: ``start_on_demand``
starts a worker only when a task finds none idle (as ``concurrent.futures``
does outside fork); ``on_dispatch`` is asked just before a task goes to a
worker and may withdraw it (a cancelled future); ``on_stop`` runs once the
last worker is gone; ``conventions`` picks whose failure rules the workers
follow.

Thread-safety: all state below is guarded by ``_lock``; answers are handed
to ``on_answer`` outside it.  ``on_dispatch`` is called under it, so it must
not call back into the supervisor.
"""

from __future__ import annotations

import collections
import enum
import os
import select
import threading

from ._errors import BrokenPoolError, WorkerDiedError
from ._serialization import ObjectStore
from ._worker import ACK, HEADER, STOP, Conventions, run_worker

__all__ = ["Supervisor", "State"]


class State(enum.Enum):
    RUNNING = "running"
    CLOSING = "closing"           # no new tasks; finish the queue, then stop workers
    TERMINATING = "terminating"   # kill workers now
    STOPPED = "stopped"


class _Worker:
    __slots__ = ("process", "conn", "tasks", "tasks_left", "retiring")

    def __init__(self, process, conn, tasks_left: int | None) -> None:
        self.process = process
        self.conn = conn
        # Tasks sent and not answered, oldest first, as queue entries: the
        # first is running, the others wait in the pipe (never started).
        self.tasks: collections.deque = collections.deque()
        self.tasks_left = tasks_left  # None: no limit (maxtasksperchild)
        self.retiring = False         # gets no more tasks


class Supervisor:
    """Runs *size* worker processes of *ctx* and feeds them tasks.

    Args:
        on_answer: ``on_answer(job, index, status, payload)`` for each task
            answered (status OK or ERROR, payload a store message), called in
            the supervisor thread.
        on_failure: ``on_failure(job, index, exception)`` for a task whose
            worker died, that could not be sent, or that was still queued
            when the supervisor was terminated or broke.
        break_on_death: a worker that dies (rather than retiring or being
            told to stop) breaks the supervisor instead of being replaced.
        start_on_demand: start no worker up front; start one (up to *size*)
            whenever a task finds no idle worker.
        on_dispatch: ``on_dispatch(job, index) -> bool``, called under the
            lock just before a task goes to a worker; False withdraws it
            (its held arguments are released; nothing else is called).
        on_stop: called once in the supervisor thread when the last worker
            is gone and the supervisor has stopped.
        conventions: the failure rules of the workers (``Conventions``).
        depth: tasks a worker may have at once: the one it runs and
            ``depth - 1`` waiting in its pipe, so that it starts the next
            one without waiting for the supervisor.  A waiting task goes
            only to a worker when no worker is free, and it is sent again
            elsewhere if its worker dies before starting it.
    """

    def __init__(self, ctx, store: ObjectStore, size: int, initializer, initargs,
                 maxtasks, on_answer, on_failure, *, break_on_death: bool = False,
                 start_on_demand: bool = False, on_dispatch=None, on_stop=None,
                 conventions: Conventions = Conventions.POOL, depth: int = 1) -> None:
        self._ctx = ctx
        self._store = store
        self._size = size
        self._worker_args = (initializer, initargs, maxtasks, conventions)
        self._on_answer = on_answer
        self._on_failure = on_failure
        self._on_dispatch = on_dispatch
        self._on_stop = on_stop
        self._break_on_death = break_on_death
        self._start_on_demand = start_on_demand
        self._depth = depth
        self._lock = threading.Lock()
        self._queue: collections.deque = collections.deque()
        self._workers: dict[object, _Worker] = {}
        self._state = State.RUNNING
        self._broken: WorkerDiedError | None = None
        self._stop_error = lambda: BrokenPoolError(
            "the pool was terminated before the task finished")
        # The wake-up pipe: any thread writes a byte to wake the supervisor
        # thread.  Its descriptors are closed when that thread ends; the
        # write end is cleared first, under its own lock, so that a late
        # wake-up never writes into a reused descriptor number.
        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)       # a full pipe wakes it already
        if not start_on_demand:
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
        self._wake()                 # the supervisor thread must watch it too

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._workers.values()]

    @property
    def processes(self) -> dict:
        """``{pid: Process}`` of the workers now running (a snapshot)."""
        with self._lock:
            return {w.process.pid: w.process for w in self._workers.values()}

    @property
    def state(self) -> State:
        return self._state

    @property
    def broken(self) -> WorkerDiedError | None:
        """The death that broke the supervisor (``break_on_death``), or None."""
        return self._broken

    @property
    def thread(self) -> threading.Thread:
        """The supervisor thread (answers and callbacks run in it)."""
        return self._thread

    # -- tasks -------------------------------------------------------------

    def submit(self, job: int, index: int, message: bytes, held) -> None:
        """Queue a task; *held* (an owning ref or None) is kept until the task
        ends.  Raises BrokenPoolError if the supervisor no longer runs."""
        with self._lock:
            if self._state is not State.RUNNING:
                raise BrokenPoolError(f"the pool is {self._state.value}; it takes no tasks")
            self._queue.append((job, index, message, held, False))
            self._dispatch_locked()

    def _dispatch_locked(self) -> None:
        for worker in list(self._workers.values()):
            if not worker.tasks and not worker.retiring:
                if not self._give_locked(worker):
                    return
        # Tasks left and no idle worker: start workers, up to the size (on
        # demand; or replacements of workers that exited while closing).
        while (self._queue and len(self._workers) < self._size
               and self._state in (State.RUNNING, State.CLOSING)):
            self._spawn_locked()
            if not self._give_locked(list(self._workers.values())[-1]):
                return
        # Still tasks left: every worker is busy; queue more in their pipes.
        for waiting in range(1, self._depth):
            for worker in list(self._workers.values()):
                if len(worker.tasks) == waiting and not worker.retiring:
                    if not self._give_locked(worker):
                        return

    def _give_locked(self, worker: _Worker) -> bool:
        """Send the next task *on_dispatch* accepts to *worker*; False if
        the queue ran out first."""
        while self._queue:
            entry = self._queue.popleft()
            job, index, _, held, dispatched = entry
            if dispatched or self._on_dispatch is None or self._on_dispatch(job, index):
                break
            if held is not None:
                self._store.release(held)            # withdrawn: it never runs
        else:
            return False
        message = entry[2]
        worker.tasks.append(entry[:4] + (True,))
        if worker.tasks_left is not None:
            worker.tasks_left -= 1
            worker.retiring = worker.tasks_left == 0
        self._send(worker, message)
        return True

    # -- the supervisor thread ---------------------------------------------

    def _run(self) -> None:
        # One poll object for the thread's life, updated as workers come and
        # go: building a selector per wake-up (multiprocessing's wait()) cost
        # more than handling a small answer.
        poller = select.poll()
        watched: dict[int, tuple[str, _Worker | None]] = {}
        while True:
            with self._lock:
                if self._state is State.STOPPED or (
                        self._state is not State.RUNNING and not self._workers):
                    self._state = State.STOPPED
                    break
                wanted = {self._wake_r: ("wake", None)}
                for worker in self._workers.values():
                    wanted[worker.conn.fileno()] = ("answer", worker)
                    wanted[worker.process.sentinel] = ("exit", worker)
            for fd in watched.keys() - wanted.keys():
                poller.unregister(fd)
            for fd in wanted.keys() - watched.keys():
                poller.register(fd, select.POLLIN)
            watched = wanted
            ready = [watched[fd] for fd, _ in poller.poll()]
            for what, worker in ready:
                if what == "wake":
                    os.read(self._wake_r, 4096)
                elif what == "answer":
                    self._drain(worker)
            for what, worker in ready:
                if what == "exit":
                    self._drain(worker, everything=True)   # answers sent before it died
                    self._on_exit(worker)
            self._stop_idle_workers_if_closing()
        with self._wake_lock:
            os.close(self._wake_w)
            self._wake_w = None
        os.close(self._wake_r)
        if self._on_stop is not None:
            self._on_stop()

    def _drain(self, worker: _Worker | None, *, everything: bool = False) -> None:
        """Handle one answer of *worker*, which the poller found waiting; with
        *everything*, every answer still in its pipe (it has exited)."""
        while worker is not None:
            try:
                if everything and not worker.conn.poll():
                    return
                message = worker.conn.recv_bytes()
            except (EOFError, OSError):
                return
            job, index, status = HEADER.unpack_from(message)
            payload = memoryview(message)[HEADER.size:]
            # Idle from now on, before the answer is delivered: a caller that
            # submits as soon as it has its result finds this worker free.
            # (Sends to a worker happen under the lock, so the ACK below and
            # a caller's next task never interleave on the pipe.)
            with self._lock:
                task = worker.tasks.popleft() if worker.tasks else None
            self._on_answer(job, index, status, payload)     # takes its own hold
            with self._lock:
                if self._store.is_held_message(payload):
                    self._send(worker, ACK)                  # the worker lets go
                self._dispatch_locked()
            if task is not None and task[3] is not None:
                self._store.release(task[3])                 # the task's arguments
            if not everything:
                return

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
            task = worker.tasks.popleft() if worker.tasks else None
            unstarted, worker.tasks = list(worker.tasks), collections.deque()
            # A death, not a retirement or a STOP: the pool breaks if so told.
            breaks = (self._break_on_death and (task is not None or not worker.retiring)
                      and self._state in (State.RUNNING, State.CLOSING))
            if not breaks:
                # Tasks waiting in the dead worker's pipe never started: they
                # go first to another worker (or fail with the queue).
                self._queue.extendleft(reversed(unstarted))
                unstarted = []
        worker.conn.close()
        self._store.raw.reap_dead_processes()    # its views, its unsealed objects
        pid, exitcode = worker.process.pid, worker.process.exitcode

        def broke() -> WorkerDiedError:      # what every unfinished task gets
            return WorkerDiedError(pid, exitcode, replaced=False)

        if breaks:
            self._broken = broke()
        for job, index, _, held, _ in unstarted:       # broken: they fail too
            if held is not None:
                self._store.release(held)
            self._on_failure(job, index, broke())
        if task is not None:
            job, index, _, held, _ = task
            if held is not None:
                self._store.release(held)
            if breaks:
                error = broke()
            elif self._state is State.TERMINATING:
                error = self._stop_error()
            else:
                error = WorkerDiedError(pid, exitcode)
            self._on_failure(job, index, error)
        if breaks:
            self._terminate(broke)
            return
        with self._lock:
            if self._state is State.RUNNING and not self._start_on_demand:
                self._spawn_locked()
            self._dispatch_locked()

    def _stop_idle_workers_if_closing(self) -> None:
        with self._lock:
            if self._state is not State.CLOSING or self._queue:
                return
            for worker in self._workers.values():
                if not worker.tasks and not worker.retiring:
                    worker.retiring = True
                    self._send(worker, STOP)

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w is None:         # the supervisor thread has ended
                return
            try:
                os.write(self._wake_w, b"x")
            except OSError:                  # full: the thread has a wake-up pending
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
        self._terminate(None)

    def _terminate(self, make_error) -> None:
        """Terminate; queued and running tasks fail with ``make_error()``
        (None: BrokenPoolError saying the pool was terminated)."""
        with self._lock:
            if self._state in (State.STOPPED, State.TERMINATING):
                return
            self._state = State.TERMINATING
            if make_error is not None:
                self._stop_error = make_error
            queued, self._queue = list(self._queue), collections.deque()
            workers = list(self._workers.values())
        for worker in workers:
            worker.process.terminate()
        for job, index, _, held, _ in queued:
            if held is not None:
                self._store.release(held)
            error = (BrokenPoolError("the pool was terminated") if make_error is None
                     else make_error())
            self._on_failure(job, index, error)
        self._wake()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the supervisor thread (and so every worker) to end."""
        self._thread.join(timeout)
