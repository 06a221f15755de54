"""Parent side of the worker processes: dispatch, answers, deaths.

::

    caller threads --submit()--> an idle worker's out buffer, or the queue;
                                 one byte on the wake-up pipe unless one
                                 is pending
                                              |
                                              v
        supervisor thread: the only reader and writer of worker sockets
          dispatch  out buffer (refilled from the queue) --> its socket,
                    as much as the socket takes now (the rest when it
                    polls writable)
          answers   socket --> in buffer --> whole Answers --> on_answer,
                    ACK into the out buffer
          deaths    sentinel --> read every dead worker's socket to the end,
                    and what the others sent --> reap the dead in the store --> fail their running
                    tasks --> start replacements
                                              |
                                              v
                            worker 1..n (``_worker.run_worker``)

Callers never read a worker's socket and never wait on one: ``submit``
gives the task to an idle worker (into that worker's out buffer, in
memory) or leaves it in the queue, and wakes the supervisor thread by one
byte on the wake-up pipe, only if no wake-up is pending already.  The supervisor
thread waits in one ``poll`` on every worker socket (readable; writable while it has bytes
queued for it), every worker's sentinel and the wake-up pipe.  Its
sockets are non-blocking: it never waits for one worker, however large
the message or however stopped the process, so answers keep being read
while a task waits for room in a busy worker's socket (the sizes between
the socket buffer and the store threshold travel in-band).

Each worker has at most *depth* tasks in flight: the one it runs and the
ones waiting in its socket, so the supervisor always knows which tasks a
worker holds, and which of them it has started (only the oldest).  A task
goes to an idle worker first; when every worker is busy, into a busy
worker's socket (up to *depth*), so that the worker starts it without
waiting for the supervisor thread; otherwise it waits in the queue until a
worker answers.

When a worker dies (any signal, ``os._exit``, the OOM killer), the
answers it sent before dying are read first: they name store objects that
only the dead worker holds, and reaping frees every dead process's holds at
once.  So every worker found dead has its socket read to the end, and
what the others have sent is read too (one may be dead for the store before
its sentinel fires), before the store reaps.  Then its running task fails with WorkerDiedError naming the
pid and signal, the task's arguments are released, and tasks waiting in its
socket (never started) go back to the queue.  What happens next is a choice
of the front end:

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

Thread-safety: the queue, the worker table, each worker's task list and
the state are guarded by ``_lock``; a thread that holds it may append to a
worker's out buffer.  Only the supervisor thread reads, writes and closes
the sockets: a caller's thread, where a KeyboardInterrupt may land between
any two lines, never touches one.  Answers are handed to ``on_answer`` outside
the lock; ``on_dispatch`` is called under it, so it must not call back
into the supervisor.
"""

from __future__ import annotations

import collections
import enum
import os
import select
import socket
import sys
import threading
from multiprocessing.connection import Connection

from ._errors import BrokenPoolError, WorkerDiedError
from ._protocol import ACK, STOP, Answer, FrameReader, FrameWriter, Task, drop_parent_end, \
    own_parent_end
from ._serialization import ObjectStore
from ._store import MAX_PROCESSES
from ._worker import Conventions, run_worker

__all__ = ["Supervisor", "State", "MAX_WORKERS", "worker_count"]

_WAKE, _SOCKET, _EXIT = "wake", "socket", "exit"


#: Workers one pool may run at once: a store's process table holds
#: MAX_PROCESSES processes, and the parent takes one entry.  The default
#: worker count (the CPU count) is capped at this; more is refused.
MAX_WORKERS = MAX_PROCESSES - 1


def worker_count(requested: int | None, name: str) -> int:
    """The number of workers to run for *requested* (None: one per CPU, at
    most MAX_WORKERS).

    Raises:
        ValueError: *requested* is above MAX_WORKERS.
    """
    if requested is None:
        return min(os.cpu_count() or 1, MAX_WORKERS)
    if requested > MAX_WORKERS:
        raise ValueError(
            f"{name} must be at most {MAX_WORKERS}, got {requested}: a pool's store "
            f"holds {MAX_PROCESSES} processes, the parent included (use several pools)")
    return requested

class State(enum.Enum):
    RUNNING = "running"
    CLOSING = "closing"           # no new tasks; finish the queue, then stop workers
    TERMINATING = "terminating"   # kill workers now
    STOPPED = "stopped"


class _Worker:
    """One worker process and the supervisor's end of its socket."""

    __slots__ = ("process", "fd", "exit_fd", "reader", "writer", "tasks", "tasks_left",
                 "retiring", "exited", "answered")

    def __init__(self, process, fd: int, tasks_left: int | None,
                 start_method: str) -> None:
        self.process = process
        self.fd = fd                  # owned: closed when the worker has exited
        self.exit_fd = _exit_watch(process, start_method)
        self.reader = FrameReader(fd)
        self.writer = FrameWriter(fd)
        # Tasks sent and not answered, oldest first, as queue entries: the
        # first is running, the others wait in the socket (never started).
        self.tasks: collections.deque = collections.deque()
        self.tasks_left = tasks_left  # None: no limit (maxtasksperchild)
        self.retiring = False         # gets no more tasks (it will exit)
        self.exited = False           # seen dead: gets no more tasks either
        self.answered = False         # answered since it last got a burst


def _exit_watch(process, start_method: str) -> int:
    """A descriptor that turns readable when *process* exits.

    A pidfd where the kernel has them: the process's own sentinel is a pipe
    that a child the task started inherits (fork, spawn), so it would stay
    open as long as that child lives, and the worker's exit would never be
    seen.  Under forkserver the sentinel is the forkserver's report of the
    exit, which no task's child can hold, and the forkserver, not this
    process, reaps the worker, so its pid could be reused before a pidfd is
    opened: the sentinel then.  Otherwise (no pidfd) the sentinel too.  A
    pidfd is owned by the caller; the sentinel by the process object."""
    if start_method == "forkserver":
        return process.sentinel
    try:
        return os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        return process.sentinel


def _close_exit_watch(worker: "_Worker") -> None:
    if worker.exit_fd != worker.process.sentinel:
        os.close(worker.exit_fd)


def _exited(workers: list[_Worker]) -> list[_Worker]:
    """The workers among *workers* that have exited (no waiting)."""
    poller = select.poll()
    by_fd = {}
    for worker in workers:
        by_fd[worker.exit_fd] = worker
        poller.register(worker.exit_fd, select.POLLIN)
    return [by_fd[fd] for fd, _ in poller.poll(0)]


class Supervisor:
    """Runs *size* worker processes of *ctx* and feeds them tasks.

    Args:
        on_answer: ``on_answer(job, index, ok, payload)`` for each task
            answered (*payload* a store message of the result, or of the
            exception if not *ok*), called in the supervisor thread.
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
            ``depth - 1`` waiting in its socket, so that it starts the next
            one without waiting for the supervisor.  A waiting task goes
            only to a worker when no worker is free, and it is sent again
            elsewhere if its worker dies before starting it.
        burst: tasks a worker may have at once while the queue is long:
            each busy worker gets up to its share of the queue (the queue's
            length over the workers), at most *burst*, so that one write
            carries many small tasks and the worker reads them in one.  Only
            a worker that has answered since its last burst gets one, so a
            stopped worker holds back at most *burst* tasks; the last tasks
            of a queue go *depth* at a time.  Default: *depth*.
    """

    def __init__(self, ctx, store: ObjectStore, size: int, initializer, initargs,
                 maxtasks, on_answer, on_failure, *, break_on_death: bool = False,
                 start_on_demand: bool = False, on_dispatch=None, on_stop=None,
                 conventions: Conventions = Conventions.POOL, depth: int = 1,
                 burst: int | None = None) -> None:
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
        self._burst = depth if burst is None else max(burst, depth)
        self._lock = threading.Lock()
        self._queue: collections.deque = collections.deque()
        self._workers: dict[int, _Worker] = {}         # by socket descriptor
        self._state = State.RUNNING
        self._broken: WorkerDiedError | None = None
        self._stop_error = lambda: BrokenPoolError(
            "the pool was terminated before the task finished")
        # The wake-up pipe: a thread writes a byte to make the supervisor
        # thread look at the queue and the state again, unless a wake-up
        # is pending already (``_wake_pending``, under ``_lock``).  Its
        # descriptors are closed when that thread ends; the write end is
        # cleared first, under its own lock, so that a late wake-up never
        # writes into a reused descriptor number.
        self._pid = os.getpid()
        self._wake_pending = False
        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)          # a full pipe wakes it already
            own_parent_end(fd)
        self._thread = threading.Thread(target=self._run, name="shmpool-supervisor",
                                        daemon=True)
        if not start_on_demand:
            with self._lock:
                for _ in range(size):
                    self._spawn_locked()
        self._thread.start()

    # -- workers -----------------------------------------------------------

    def _spawn_locked(self) -> None:
        ours, theirs = socket.socketpair()
        fd = ours.detach()
        os.set_blocking(fd, False)
        own_parent_end(fd)
        conn = Connection(theirs.detach())
        # PR_SET_PDEATHSIG fires when the *thread* that started the worker
        # ends: ask for it only when that thread lives as long as we do.
        here = threading.current_thread()
        lasting = (here is threading.main_thread() or here is self._thread
                   or self._ctx.get_start_method() == "forkserver")
        process = self._ctx.Process(
            target=run_worker, args=(conn, self._store, *self._worker_args),
            kwargs={"die_with_parent": lasting}, name="shmpool-worker", daemon=True)
        try:
            process.start()
        except BaseException:
            drop_parent_end(fd)
            os.close(fd)
            raise
        finally:
            conn.close()
        self._workers[fd] = _Worker(process, fd, self._worker_args[2],
                                    self._ctx.get_start_method())

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
        """Queue task (*job*, *index*) whose payload is the store message
        *message*; *held* (an owning ref or None) is kept until the task
        ends.  An idle worker takes it at once (``on_dispatch`` runs here);
        its bytes go out from the supervisor thread.  Never waits for a
        worker or a socket: only for the lock and, with ``start_on_demand``,
        for a worker process to start.

        Raises:
            BrokenPoolError: the supervisor no longer takes tasks.
        """
        with self._lock:
            if self._state is not State.RUNNING:
                raise BrokenPoolError(f"the pool is {self._state.value}; it takes no tasks")
            self._queue.append((job, index, message, held, False))
            if not self._dispatch_locked():
                return
        # The supervisor thread writes the task out (and watches a worker
        # started just now).
        self._wake()

    def _dispatch_locked(self) -> bool:
        """Give queued tasks to workers; True if any was given."""
        before = len(self._queue)
        self._fill_locked()
        return len(self._queue) != before

    def _fill_locked(self) -> None:
        for worker in list(self._workers.values()):
            if not worker.tasks and not (worker.retiring or worker.exited):
                if not self._give_locked(worker):
                    return
        # Tasks left and no idle worker: start workers, up to the size (on
        # demand; or replacements of workers that exited while closing).
        while (self._queue and len(self._workers) < self._size
               and self._state in (State.RUNNING, State.CLOSING)):
            self._spawn_locked()
            if not self._give_locked(list(self._workers.values())[-1]):
                return
        # Still tasks left: every worker is busy; queue more in their sockets.
        for waiting in range(1, self._depth):
            for worker in list(self._workers.values()):
                if len(worker.tasks) == waiting and not (worker.retiring or worker.exited):
                    if not self._give_locked(worker):
                        return
        # A long queue: every busy worker takes its share in one write.
        # Only a worker that has answered since its last burst gets one: a
        # stopped worker holds back at most one burst, not a share each time.
        share = min(self._burst, len(self._queue) // max(len(self._workers), 1))
        if share > self._depth:
            for worker in list(self._workers.values()):
                if not worker.answered:
                    continue
                worker.answered = False
                while len(worker.tasks) < share and not (worker.retiring or worker.exited):
                    if not self._give_locked(worker):
                        return

    def _give_locked(self, worker: _Worker) -> bool:
        """Queue the next task *on_dispatch* accepts for *worker*; False if
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
        worker.tasks.append(entry[:4] + (True,))
        if worker.tasks_left is not None:
            worker.tasks_left -= 1
            worker.retiring = worker.tasks_left == 0
        worker.writer.append(Task(job, index, entry[2]))
        return True

    # -- the supervisor thread ---------------------------------------------

    def _run(self) -> None:
        # One poll object for the thread's life, updated as workers come and
        # go: building a selector per wake-up (multiprocessing's wait()) cost
        # more than handling a small answer.
        poller = select.poll()
        masks: dict[int, int] = {}
        while True:
            with self._lock:
                if self._state is State.STOPPED or (
                        self._state is not State.RUNNING and not self._workers):
                    self._state = State.STOPPED
                    break
                workers = list(self._workers.values())
            roles: dict[int, tuple[str, _Worker | None]] = {self._wake_r: (_WAKE, None)}
            wanted = {self._wake_r: select.POLLIN}
            for worker in workers:
                if not worker.reader.eof:        # at end-of-file, only the sentinel matters
                    roles[worker.fd] = (_SOCKET, worker)
                    wanted[worker.fd] = select.POLLIN | (
                        select.POLLOUT if worker.writer.pending else 0)
                roles[worker.exit_fd] = (_EXIT, worker)
                wanted[worker.exit_fd] = select.POLLIN
            for fd in masks.keys() - wanted.keys():
                poller.unregister(fd)
            for fd, mask in wanted.items():
                if masks.get(fd) != mask:
                    poller.register(fd, mask)
            masks = wanted
            died = False
            for fd, events in poller.poll():
                role, worker = roles.get(fd, (None, None))
                if role is _WAKE:
                    self._take_wake_up()
                elif role is _SOCKET:
                    if events & select.POLLOUT:
                        self._flush(worker)
                    if events & ~select.POLLOUT:
                        self._receive(worker)
                elif role is _EXIT:
                    died = True
            if died:
                self._handle_deaths()
            with self._lock:
                self._dispatch_locked()
                self._stop_idle_workers_if_closing_locked()
                workers = list(self._workers.values())
            for worker in workers:
                if worker.writer.pending:
                    self._flush(worker)
        with self._wake_lock:
            drop_parent_end(self._wake_w)
            os.close(self._wake_w)
            self._wake_w = None
        drop_parent_end(self._wake_r)
        os.close(self._wake_r)
        if self._on_stop is not None:
            self._on_stop()

    def _take_wake_up(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:                 # after emptying the pipe: see _wake
            self._wake_pending = False

    def _receive(self, worker: _Worker, *, everything: bool = False) -> None:
        """Handle the answers *worker* has sent; a partial one waits in its
        reader.  With *everything*, read until nothing is left (it has
        exited, so what it sent is all there)."""
        try:
            messages = worker.reader.read(sys.maxsize) if everything else worker.reader.read()
        except ValueError as exc:                # not our protocol: end it
            print(f"shmpool: worker process {worker.process.pid}: {exc}", file=sys.stderr)
            worker.process.kill()
            worker.reader.eof = True
            return
        for message in messages:
            if isinstance(message, Answer):
                self._deliver(worker, message)

    def _deliver(self, worker: _Worker, answer: Answer) -> None:
        # Idle from now on, before the answer is delivered: a caller that
        # submits as soon as it has its result finds this worker free.
        with self._lock:
            task = worker.tasks.popleft() if worker.tasks else None
            worker.answered = True
        self._on_answer(answer.job, answer.index, answer.ok, answer.payload)  # takes its hold
        if self._store.is_held_message(answer.payload):
            worker.writer.append(ACK)                 # the worker lets go
        if task is not None and task[3] is not None:
            self._store.release(task[3])              # the task's arguments

    @staticmethod
    def _flush(worker: _Worker) -> bool:
        """Write what the socket takes now; True if nothing is left.  In the
        supervisor thread only."""
        try:
            return worker.writer.flush()
        except OSError:
            worker.writer.clear()       # it died: its exit watch says so shortly
            return True

    def _handle_deaths(self) -> None:
        """Read the answers of every dead worker, then reap, then fail their
        tasks.  Reaping frees the holds of *every* dead process, so a worker
        reaped before its socket is read would lose the answers it sent."""
        dead: dict[int, _Worker] = {}
        while True:                      # callbacks run meanwhile: others may die
            with self._lock:
                alive = [w for w in self._workers.values() if w.fd not in dead]
            newly = _exited(alive)
            if not newly:
                break
            with self._lock:             # no task goes to a dead worker meanwhile
                for worker in newly:
                    worker.exited = True
            for worker in newly:
                dead[worker.fd] = worker
                self._receive(worker, everything=True)
        # A process can be dead for the store before its sentinel fires (under
        # forkserver the sentinel is the forkserver's report of the exit), and
        # the reap frees its holds too: take what every other worker has sent
        # as well.  What a process sent before dying is all in its socket.
        for worker in alive:
            self._receive(worker)
        self._store.raw.reap_dead_processes()    # their views, their unsealed objects
        for worker in dead.values():
            self._on_exit(worker)

    def _on_exit(self, worker: _Worker) -> None:
        worker.process.join()
        with self._lock:
            self._workers.pop(worker.fd, None)
            task = worker.tasks.popleft() if worker.tasks else None
            unstarted, worker.tasks = list(worker.tasks), collections.deque()
            # A death, not a retirement or a STOP: the pool breaks if so told.
            breaks = (self._break_on_death and (task is not None or not worker.retiring)
                      and self._state in (State.RUNNING, State.CLOSING))
            if not breaks and self._state in (State.RUNNING, State.CLOSING):
                # Tasks waiting in the dead worker's socket never started:
                # they go first to another worker (or fail with the queue).
                # Once terminating, the queue has been failed already and
                # nothing would fail them: they fail below.
                self._queue.extendleft(reversed(unstarted))
                unstarted = []
        drop_parent_end(worker.fd)
        os.close(worker.fd)
        _close_exit_watch(worker)
        pid, exitcode = worker.process.pid, worker.process.exitcode

        def broke() -> WorkerDiedError:      # what every unfinished task gets
            return WorkerDiedError(pid, exitcode, replaced=False)

        if breaks:
            self._broken = broke()
        for job, index, _, held, _ in unstarted:       # broken or stopping: they fail too
            if held is not None:
                self._store.release(held)
            self._on_failure(job, index, broke() if breaks else self._stop_error())
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

    def _stop_idle_workers_if_closing_locked(self) -> None:
        if self._state is not State.CLOSING or self._queue:
            return
        for worker in self._workers.values():
            if not worker.tasks and not worker.retiring:
                worker.retiring = True
                worker.writer.append(STOP)

    def _write_wake(self) -> None:
        with self._wake_lock:
            # Gone, or a fork child's copy of the supervisor (its descriptors
            # were closed at fork): nothing to wake.
            if self._wake_w is None or os.getpid() != self._pid:
                return
            try:
                os.write(self._wake_w, b"x")
            except OSError:                  # full: the thread has a wake-up pending
                pass

    def _wake(self) -> None:
        """Wake the supervisor thread, unless a wake-up is pending already.

        The supervisor thread empties the pipe, then clears the mark, then
        looks at the queue and the state: whatever a thread changed before
        finding the mark set is seen by that look.  The byte is written
        before the mark is set: an interrupt in between costs one spare
        wake-up, never a lost one."""
        if threading.current_thread() is self._thread:
            return
        with self._lock:
            if not self._wake_pending:
                self._write_wake()
                self._wake_pending = True

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
