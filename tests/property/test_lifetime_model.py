"""The store's lifetime rules, checked against a model across processes.

The test process (A) and a peer process (B, driven through a pipe by a
small command loop) share one RawStore.  Rules put, create objects and
seal or abort them later, get, drop views, release, delete, read
dependencies, send messages both ways (retain in one process, adopt in the
other), fork children that hold and check inherited views (unsealed ones
too) and then exit or are killed, reap, and close the peer's store.  The
model tracks who holds each object.

After every step: every live view, in A, in B and in live fork children,
reads exactly the bytes put (by hash), so no freed block is ever visible
through a view; the store's invariants hold; the number of live objects is
what the holds say.  At the end all space comes back.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal

import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from shmpool import ObjectNotFoundError, ObjectRef, ObjectStateError, StoreFullError
from shmpool._store import RawStore

from conftest import DEADLOCK_TIMEOUT

_FORK = "fork" in multiprocessing.get_all_start_methods()
pytestmark = pytest.mark.skipif(not _FORK, reason="the model forks children")

CAPACITY = 4 << 20
MAX_OBJECT = 48 * 1024


def _content(seed: int, nbytes: int) -> bytes:
    return ((np.arange(nbytes, dtype=np.uint64) * (2 * seed + 1) + seed) % 251).astype(
        np.uint8).tobytes()


def _digest(view) -> str:
    return hashlib.blake2b(view).hexdigest()


def _name(ref: ObjectRef) -> ObjectRef:
    """A borrowed copy of *ref*: the model's key, which holds nothing."""
    return ObjectRef(ref.token, ref.slot, ref.generation)


def _write(store: RawStore, seed: int, nbytes: int, depends_on=()):
    builder = store.create(nbytes, depends_on=depends_on)
    builder.view[:] = _content(seed, nbytes)
    return builder.seal()


# -- the peer: one command at a time from the pipe --------------------------

def _peer_main(store: RawStore, conn) -> None:
    views: dict[int, tuple[memoryview, str]] = {}
    refs: dict[int, object] = {}
    while True:
        cmd, args = conn.recv()
        reply = None
        try:
            if cmd == "get":
                vid, ref, digest = args
                views[vid] = (store.get(ref), digest)
            elif cmd == "drop":
                del views[args]
            elif cmd == "put":
                rid, seed, nbytes = args
                refs[rid] = _write(store, seed, nbytes)
                reply = refs[rid]
            elif cmd == "adopt":
                rid, ref = args
                refs[rid] = store.adopt(ref)
            elif cmd == "release":
                store.release(refs.pop(args))
            elif cmd == "send":
                store.retain(refs[args])
            elif cmd == "check":
                reply = sorted(vid for vid, (view, d) in views.items() if _digest(view) != d)
            elif cmd == "close":
                refs.clear()
                store.close()
            elif cmd == "exit":
                conn.send(("ok", None))
                return
            conn.send(("ok", reply))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class _Peer:
    def __init__(self, ctx, store: RawStore) -> None:
        self.conn, theirs = ctx.Pipe()
        self.process = ctx.Process(target=_peer_main, args=(store, theirs), daemon=True)
        self.process.start()
        theirs.close()
        self.closed = False

    def call(self, cmd: str, args=None):
        self.conn.send((cmd, args))
        if not self.conn.poll(DEADLOCK_TIMEOUT):
            raise AssertionError(f"the peer did not answer {cmd!r}")
        status, reply = self.conn.recv()
        if status != "ok":
            raise _PeerError(reply)
        return reply


class _PeerError(Exception):
    pass


# -- fork children: check inherited views now and when told to exit ---------

def _child_main(views, conn) -> None:
    while True:
        command = conn.recv()
        conn.send(sorted(vid for vid, (view, d) in views.items() if _digest(view) != d))
        if command == "exit":
            return


class LifetimeModel(RuleBasedStateMachine):
    """A RawStore shared by this process, a peer and fork children, against
    a model of who holds what.  Read-only, so that every view holds its
    object (copy-on-write views of objects under a page are copies)."""

    def __init__(self):
        super().__init__()
        self.ctx = multiprocessing.get_context("fork")
        self.store = RawStore(CAPACITY, space_timeout=0.05, readonly=True)
        self.baseline = self.store.statistics()
        self.peer = _Peer(self.ctx, self.store)
        self.next_id = 0
        self.seed_of: dict = {}           # ref -> (seed, nbytes)
        self.deps: dict = {}              # ref -> refs it depends on
        self.holders: dict = {}           # ref -> set of holder tags
        self.deleted: set = set()
        self.freed: set = set()
        self.a_refs: dict = {}            # rid -> owning ref
        self.a_views: dict = {}           # vid -> (ref, view)
        self.a_builders: dict = {}        # bid -> builder (created, unsealed)
        self.b_refs: dict = {}            # rid -> ref
        self.b_views: dict = {}           # vid -> ref
        self.in_flight: dict = {}         # mid -> (ref, "to_b" | "to_a")
        self.children: dict = {}          # cid -> (process, conn, refs held)
        self.dead: dict = {}              # cid -> refs held, unreaped

    # -- model ------------------------------------------------------------

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _digest_of(self, ref) -> str:
        return _digest(_content(*self.seed_of[ref]))

    def _hold(self, ref, tag) -> None:
        self.holders.setdefault(ref, set()).add(tag)

    def _unhold(self, ref, tag) -> None:
        held = self.holders[ref]
        held.discard(tag)
        if not held:                      # freed: so are the holds it had
            del self.holders[ref]
            self.freed.add(ref)
            for dep in self.deps.get(ref, ()):
                self._unhold(dep, ("dep", ref))

    def _status(self, ref) -> str:
        """'alive', 'gone', or 'maybe' (held only by dead, unreaped children,
        directly or through objects that depend on it)."""
        tags = self.holders.get(ref, set())
        if not tags:
            return "gone"
        for tag in tags:
            if tag[0] == "dep":           # as alive as the object depending on it
                if self._status(tag[1]) == "alive":
                    return "alive"
            elif tag[0] != "dead":
                return "alive"
        return "maybe"

    def _a_holds(self) -> set:
        return ({_name(ref) for ref in self.a_refs.values()}
                | {ref for ref, _ in self.a_views.values()}
                | {_name(b.ref) for b in self.a_builders.values()})

    def _unsealed(self, ref) -> bool:
        return any(_name(b.ref) == ref for b in self.a_builders.values())

    def _known(self) -> list:
        return sorted(self.seed_of, key=lambda r: (r.slot, r.generation))

    # -- this process ---------------------------------------------------------

    @rule(nbytes=st.integers(0, MAX_OBJECT))
    def put(self, nbytes):
        seed = self._new_id()
        try:
            owned = _write(self.store, seed, nbytes)
        except StoreFullError:
            return
        ref = _name(owned)
        self.seed_of[ref] = (seed, nbytes)
        rid = self._new_id()
        self.a_refs[rid] = owned
        self._hold(ref, ("a_ref", rid))

    @initialize(sizes=st.lists(st.integers(0, MAX_OBJECT), min_size=1, max_size=3))
    def some_objects_and_views(self, sizes):
        for nbytes in sizes:
            self.put(nbytes)
        for rid, owned in list(self.a_refs.items()):
            ref = _name(owned)
            vid = self._new_id()
            self.a_views[vid] = (ref, self.store.get(ref))
            self._hold(ref, ("a_view", vid))

    @precondition(lambda self: len(self.a_builders) < 3)
    @rule(nbytes=st.integers(0, MAX_OBJECT))
    def create(self, nbytes):
        """An object being written: only this process may seal or abort it."""
        seed = self._new_id()
        try:
            builder = self.store.create(nbytes)
        except StoreFullError:
            return
        builder.view[:] = _content(seed, nbytes)
        ref = _name(builder.ref)
        self.seed_of[ref] = (seed, nbytes)
        bid = self._new_id()
        self.a_builders[bid] = builder
        self._hold(ref, ("a_build", bid))

    @precondition(lambda self: self.a_builders)
    @rule(data=st.data(), seal=st.booleans())
    def finish_builder(self, data, seal):
        """Rule 1: whoever else held it meanwhile, the creator still seals
        it; dropped unsealed, it is aborted."""
        bid = data.draw(st.sampled_from(sorted(self.a_builders)))
        builder = self.a_builders.pop(bid)
        ref = _name(builder.ref)
        if seal:
            rid = self._new_id()
            self.a_refs[rid] = builder.seal()
            self._hold(ref, ("a_ref", rid))
        else:
            self.deleted.add(ref)                # aborted: get() fails from now on
        del builder
        self._unhold(ref, ("a_build", bid))

    @precondition(lambda self: self.a_views)
    @rule(data=st.data(), nbytes=st.integers(0, 4096))
    def derive(self, data, nbytes):
        vid = data.draw(st.sampled_from(sorted(self.a_views)))
        source = self.a_views[vid][0]
        seed = self._new_id()
        try:
            owned = _write(self.store, seed, nbytes, depends_on=(source,))
        except StoreFullError:
            return
        ref = _name(owned)
        self.seed_of[ref] = (seed, nbytes)
        self.deps[ref] = (source,)
        self._hold(source, ("dep", ref))
        rid = self._new_id()
        self.a_refs[rid] = owned
        self._hold(ref, ("a_ref", rid))

    @precondition(lambda self: self.seed_of)
    @rule(data=st.data())
    def get(self, data):
        ref = data.draw(st.sampled_from(self._known()))
        status = self._status(ref)
        try:
            view = self.store.get(ref)
        except ObjectStateError:
            assert self._unsealed(ref), f"{ref} sealed, yet get() refused it"
            return
        except ObjectNotFoundError:
            assert status != "alive" or ref in self.deleted, f"{ref} alive but not found"
            return
        assert status != "gone", f"{ref} was freed, yet get() found it"
        assert ref not in self.deleted, f"{ref} was deleted, yet get() found it"
        vid = self._new_id()
        self.a_views[vid] = (ref, view)
        self._hold(ref, ("a_view", vid))

    @precondition(lambda self: any(self.deps.get(ref) for ref, _ in self.a_views.values()))
    @rule(data=st.data())
    def read_dependency(self, data):
        vid = data.draw(st.sampled_from(sorted(
            v for v, (ref, _) in self.a_views.items() if self.deps.get(ref))))
        holder = self.a_views[vid][0]
        dep = self.deps[holder][0]
        view = self.store.get_dependency(holder, dep)      # deleted or not
        new = self._new_id()
        self.a_views[new] = (dep, view)
        self._hold(dep, ("a_view", new))

    @precondition(lambda self: self.a_views)
    @rule(data=st.data())
    def drop_view(self, data):
        vid = data.draw(st.sampled_from(sorted(self.a_views)))
        ref, view = self.a_views.pop(vid)
        del view
        self._unhold(ref, ("a_view", vid))

    @precondition(lambda self: self.a_refs)
    @rule(data=st.data(), delete=st.booleans())
    def release(self, data, delete):
        rid = data.draw(st.sampled_from(sorted(self.a_refs)))
        owned = self.a_refs.pop(rid)
        ref = _name(owned)
        if delete:
            self.store.delete(owned)
            self.deleted.add(ref)
        else:
            self.store.release(owned)
        self._unhold(ref, ("a_ref", rid))

    # -- messages -----------------------------------------------------------------

    def _send(self, ref, direction: str) -> None:
        """A message naming *ref* is in flight, holding one retained count."""
        mid = self._new_id()
        self.in_flight[mid] = (ref, direction)
        self._hold(ref, ("retained", mid))

    def _receive(self, data, direction: str, holder: str, adopt) -> None:
        """The receiver adopts a message's count as an owning ref."""
        mid = data.draw(st.sampled_from(sorted(
            m for m, (_, d) in self.in_flight.items() if d == direction)))
        ref, _ = self.in_flight.pop(mid)
        rid = self._new_id()
        adopt(rid, ref)
        self._hold(ref, (holder, rid))
        self._unhold(ref, ("retained", mid))

    def _in_flight(self, direction: str) -> bool:
        return any(d == direction for _, d in self.in_flight.values())

    @precondition(lambda self: self.a_refs and not self.peer.closed)
    @rule(data=st.data())
    def send_to_peer(self, data):
        ref = _name(self.a_refs[data.draw(st.sampled_from(sorted(self.a_refs)))])
        self.store.retain(ref)
        self._send(ref, "to_b")

    @precondition(lambda self: self._in_flight("to_b") and not self.peer.closed)
    @rule(data=st.data())
    def peer_adopts(self, data):
        def adopt(rid, ref):
            self.peer.call("adopt", (rid, ref))
            self.b_refs[rid] = ref
        self._receive(data, "to_b", "b_ref", adopt)

    @precondition(lambda self: self.b_refs and not self.peer.closed)
    @rule(data=st.data())
    def peer_sends(self, data):
        rid = data.draw(st.sampled_from(sorted(self.b_refs)))
        self.peer.call("send", rid)
        self._send(self.b_refs[rid], "to_a")

    @precondition(lambda self: self._in_flight("to_a"))
    @rule(data=st.data())
    def adopt_from_peer(self, data):
        def adopt(rid, ref):
            self.a_refs[rid] = self.store.adopt(ref)
        self._receive(data, "to_a", "a_ref", adopt)

    # -- the peer ------------------------------------------------------------------

    @precondition(lambda self: not self.peer.closed)
    @rule(nbytes=st.integers(0, MAX_OBJECT))
    def peer_puts(self, nbytes):
        seed, rid = self._new_id(), self._new_id()
        try:
            ref = self.peer.call("put", (rid, seed, nbytes))
        except _PeerError as exc:
            assert "StoreFullError" in str(exc), exc
            return
        self.seed_of[ref] = (seed, nbytes)
        self.b_refs[rid] = ref
        self._hold(ref, ("b_ref", rid))

    @precondition(lambda self: self.seed_of and not self.peer.closed)
    @rule(data=st.data())
    def peer_gets(self, data):
        ref = data.draw(st.sampled_from(self._known()))
        status = self._status(ref)
        vid = self._new_id()
        try:
            self.peer.call("get", (vid, ref, self._digest_of(ref)))
        except _PeerError as exc:
            if "ObjectStateError" in str(exc):
                assert self._unsealed(ref), f"{ref} sealed, yet get() refused it"
                return
            assert "ObjectNotFoundError" in str(exc), exc
            assert status != "alive" or ref in self.deleted, f"{ref} alive but not found"
            return
        assert status != "gone" and ref not in self.deleted
        self.b_views[vid] = ref
        self._hold(ref, ("b_view", vid))

    @precondition(lambda self: self.b_views)
    @rule(data=st.data())
    def peer_drops_view(self, data):
        vid = data.draw(st.sampled_from(sorted(self.b_views)))
        self.peer.call("drop", vid)
        self._unhold(self.b_views.pop(vid), ("b_view", vid))

    @precondition(lambda self: self.b_refs and not self.peer.closed)
    @rule(data=st.data())
    def peer_releases(self, data):
        rid = data.draw(st.sampled_from(sorted(self.b_refs)))
        self.peer.call("release", rid)
        self._unhold(self.b_refs.pop(rid), ("b_ref", rid))

    @precondition(lambda self: not self.peer.closed)
    @rule()
    def peer_closes(self):
        """Rule 4: the peer's refs let go at once, its views stay valid."""
        self.peer.call("close")
        self.peer.closed = True
        for rid, ref in list(self.b_refs.items()):
            self._unhold(ref, ("b_ref", rid))
        self.b_refs.clear()

    # -- fork children ----------------------------------------------------------------

    @precondition(lambda self: len(self.children) < 3)
    @rule()
    def fork_child(self):
        """Rule 3: the child holds everything inherited from the fork on."""
        views = {vid: (view, self._digest_of(ref)) for vid, (ref, view) in self.a_views.items()}
        views.update({-bid: (b.view, self._digest_of(_name(b.ref)))
                      for bid, b in self.a_builders.items()})
        mine, theirs = self.ctx.Pipe()
        child = self.ctx.Process(target=_child_main, args=(views, theirs), daemon=True)
        child.start()
        theirs.close()
        del views
        held = self._a_holds()
        cid = self._new_id()
        for ref in held:
            self._hold(ref, ("child", cid))
        self.children[cid] = (child, mine, held)

    @precondition(lambda self: self.children)
    @rule(data=st.data(), kill=st.booleans())
    def child_ends(self, data, kill):
        cid = data.draw(st.sampled_from(sorted(self.children)))
        child, conn, held = self.children.pop(cid)
        if kill:
            os.kill(child.pid, signal.SIGKILL)
            self.dead[cid] = held
            for ref in held:
                self._hold(ref, ("dead", cid))
        else:
            assert self._ask(conn, "exit") == [], "a fork child's inherited view changed"
        child.join(DEADLOCK_TIMEOUT)
        conn.close()
        for ref in held:                  # a killed child's stay "dead" until a reap
            self._unhold(ref, ("child", cid))

    @rule()
    def reap(self):
        """Rule 2: a dead child's holds go, and nobody else's."""
        reaped = self.store.reap_dead_processes()
        assert reaped <= len(self.dead)
        for cid, held in self.dead.items():
            for ref in held:
                self._unhold(ref, ("dead", cid))
        self.dead.clear()

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def views_read_what_was_put(self):
        for vid, (ref, view) in self.a_views.items():
            assert _digest(view) == self._digest_of(ref), f"view {vid} of {ref} changed"
        assert self.peer.call("check") == [], "a peer's view changed"
        for cid, (_, conn, _) in self.children.items():
            assert self._ask(conn, "check") == [], f"fork child {cid}'s inherited view changed"

    @staticmethod
    def _ask(conn, command: str):
        conn.send(command)
        assert conn.poll(DEADLOCK_TIMEOUT), "a fork child did not answer"
        return conn.recv()

    @invariant()
    def store_agrees_with_model(self):
        self.store._check_invariants()
        live = self.store.statistics().live_objects
        sure = sum(1 for ref in self.holders if self._status(ref) == "alive")
        maybe = sum(1 for ref in self.holders if self._status(ref) == "maybe")
        lost = {ref: self.holders[ref] for ref in self.holders
                if self._status(ref) == "alive" and self.store.state_of(ref) == "free"}
        assert not lost, f"freed while held: {lost}"
        assert sure <= live <= sure + maybe, (sure, maybe, live)

    def teardown(self):
        try:
            for child, conn, _ in self.children.values():
                conn.send("exit")
                child.join(DEADLOCK_TIMEOUT)
            self.peer.call("exit")
            self.peer.process.join(DEADLOCK_TIMEOUT)
            for ref, direction in self.in_flight.values():
                self.store.release_retained(ref)
            self.a_views.clear()
            self.a_refs.clear()
            self.a_builders.clear()
            self.store.reap_dead_processes()
            after = self.store.statistics()
            assert (after.live_objects, after.in_use) == (0, self.baseline.in_use), \
                "space did not all come back"
            self.store._check_invariants()
        finally:
            # A failed step may have left helpers waiting on their pipes.
            for process in [child for child, _, _ in self.children.values()] + [
                    self.peer.process]:
                if process.is_alive():
                    process.kill()
                    process.join(DEADLOCK_TIMEOUT)
            self.store.close()


LifetimeModel.TestCase.settings = settings(max_examples=60, stateful_step_count=50,
                                           deadline=None)
TestLifetimeModel = pytest.mark.timeout(240)(LifetimeModel.TestCase)
