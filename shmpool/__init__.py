"""shmpool: multiprocessing over a sealed shared-memory object store.

This module only re-exports; the code lives in the underscore modules.
"""

from ._default_store import empty, get, put, statistics, zeros
from ._errors import (
    BrokenArenaError,
    BrokenPoolError,
    ClosedError,
    ObjectNotFoundError,
    ObjectStateError,
    SerializationError,
    ShmpoolError,
    StoreError,
    StoreFullError,
    WorkerDiedError,
)
from ._serialization import ObjectStore, StoreFullWarning, writable
from ._store import ObjectRef, StoreStatistics

__version__ = "0.1.0"

__all__ = [
    "BrokenArenaError",
    "BrokenPoolError",
    "ClosedError",
    "ObjectNotFoundError",
    "ObjectRef",
    "ObjectStateError",
    "ObjectStore",
    "SerializationError",
    "ShmpoolError",
    "StoreError",
    "StoreFullError",
    "StoreFullWarning",
    "StoreStatistics",
    "WorkerDiedError",
    "empty",
    "get",
    "put",
    "statistics",
    "writable",
    "zeros",
]
