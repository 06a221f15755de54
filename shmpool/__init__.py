"""shmpool: multiprocessing over a sealed shared-memory object store.

This module only re-exports; the code lives in the underscore modules.
"""

from ._context import get_context
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
from ._executor import ProcessPoolExecutor
from ._pool import ApplyResult, AsyncResult, IMapIterator, MapResult, Pool, PoolStatistics
from ._queue import JoinableQueue, Queue, SimpleQueue
from ._serialization import ObjectStore, StoreFullWarning, writable
from ._store import ObjectRef, StoreStatistics

__version__ = "0.1.0"

__all__ = [
    "ApplyResult",
    "AsyncResult",
    "BrokenArenaError",
    "BrokenPoolError",
    "ClosedError",
    "IMapIterator",
    "JoinableQueue",
    "MapResult",
    "ObjectNotFoundError",
    "ObjectRef",
    "ObjectStateError",
    "ObjectStore",
    "Pool",
    "PoolStatistics",
    "ProcessPoolExecutor",
    "Queue",
    "SerializationError",
    "ShmpoolError",
    "SimpleQueue",
    "StoreError",
    "StoreFullError",
    "StoreFullWarning",
    "StoreStatistics",
    "WorkerDiedError",
    "empty",
    "get",
    "get_context",
    "put",
    "statistics",
    "writable",
    "zeros",
]
