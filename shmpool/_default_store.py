"""The process's default store behind ``shmpool.put``/``get``/``empty``.

Created lazily, on first use, by the process that first needs it (never at
import); closed at interpreter exit.  In a pool worker it is the pool's store.  A fork child inherits it attached.
``get`` finds the store of a ref among every store open in this process.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref

from ._errors import ObjectNotFoundError
from ._serialization import ObjectStore
from ._store import ObjectRef, StoreStatistics

__all__ = ["default_store", "use_store", "put", "get", "empty", "zeros", "statistics",
           "register_store"]

_lock = threading.Lock()
_default: ObjectStore | None = None
_by_token: "weakref.WeakValueDictionary[int, ObjectStore]" = weakref.WeakValueDictionary()


def register_store(store: ObjectStore) -> ObjectStore:
    """Let ``shmpool.get`` find refs of *store* in this process."""
    _by_token[store.token] = store
    return store


def default_store() -> ObjectStore:
    """This process's default store, created on first call."""
    global _default
    with _lock:
        if _default is None or _default.closed:
            _default = register_store(ObjectStore())
            atexit.register(_default.close)
        return _default


def use_store(store: ObjectStore) -> None:
    """Make *store* this process's default store (a pool worker uses its
    pool's, so that ``shmpool.empty`` in a task builds results in place)."""
    global _default
    with _lock:
        _default = register_store(store)


def _store_of(ref: ObjectRef) -> ObjectStore:
    if not isinstance(ref, ObjectRef):
        raise TypeError(f"expected an ObjectRef, got {type(ref).__name__}")
    store = _by_token.get(ref.token)
    if store is None or store.closed:
        raise ObjectNotFoundError(
            f"{ref!r} belongs to a store that is not open in process {os.getpid()}: "
            f"pass the store to the process (a Process argument or Pool initargs)")
    return store


def put(obj) -> ObjectRef:
    """Seal *obj* into the default store; see ``ObjectStore.put``."""
    return default_store().put(obj)


def get(ref: ObjectRef):
    """Rebuild the object behind *ref* from whichever open store holds it."""
    return _store_of(ref).get(ref)


def empty(shape, dtype=float, order: str = "C"):
    """A writable array in the default store; see ``ObjectStore.empty``."""
    return default_store().empty(shape, dtype, order)


def zeros(shape, dtype=float, order: str = "C"):
    """A zero-filled writable array in the default store."""
    return default_store().zeros(shape, dtype, order)


def statistics() -> StoreStatistics:
    """Statistics of the default store."""
    return default_store().statistics()
