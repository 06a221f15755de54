"""Python objects in the store: pickle protocol 5 with out-of-band buffers.

``ObjectStore.put`` pickles an object with ``buffer_callback``: numpy arrays,
pandas frames (through their numpy blocks), Arrow arrays, record batches and
tables, ``pickle.PickleBuffer`` and ``memoryview`` hand their buffers out of
band.  The pickle stream and those buffers are written into one store object
(a *frame*), so each large buffer is copied exactly once.  ``get`` unpickles
with buffers that are views of shared memory: zero-copy, and writable with
page copy-on-write (``RawStore.get``): a write copies the written pages
into the writing process only, and the stored object never changes.  A
store made with ``readonly=True`` hands out read-only views instead.

Reductions are chosen as ``multiprocessing`` chooses them: copyreg's, then
those registered with ``multiprocessing.reduction.ForkingPickler.register``
(connections, sockets and file descriptors travel as the standard library
sends them; PyTorch registers its tensors there), then shmpool's own for
arrays and memoryviews, which keep big buffers out of band.

A buffer that already lives in the store (a view from ``get``, an array
from ``empty``) is not copied again: the frame refers to its object and
holds it.  A view some page of which was written in this process is
copied instead, so that what is sent is what the sender sees.  An unsealed ``empty`` array is sealed on the way, and the array
given to ``put`` turns read-only.

Messages.  ``encode``/``decode`` are what the pool and the queues send
through pipes: a value whose buffers are all below ``threshold`` travels
in-band as an ordinary pickle; otherwise its frame goes into the store and
only a ref (21 bytes) is sent, with one retained count that the receiver
adopts.  ``encode_held`` makes the same message without the count: the
sender holds the object until the receiver says it has its own hold (the
pool's protocol, so that a dead sender leaves nothing behind).  If the
store is full, the value falls back to an in-band pickle, with a warning
(once) and a count in ``statistics().fallbacks``: never an error where
``multiprocessing`` worked.  It waits up to ``space_timeout`` seconds for
space first only if waiting can free any (``_waiting_can_free``); otherwise
it falls back at once.

``encode_bounded`` is for channels of fixed-size records (the queues): the
message never exceeds the record, so a value with a long pickle goes into
the store even if its buffers are small, and there is no in-band fallback.
The sender holds the object until ``hand_over`` adds the receiver's count
just before the record is written.

Frame layout (inside one store object; native byte order)::

    +0 magic u32  +4 buffer count u32  +8 pickle length u64
    +16 one 40-byte entry per buffer: kind, a, b, c, d (u64 each)
        kind 0 (inline):   a = offset in this frame, b = nbytes
        kind 1 (external): a = slot, b = generation, c = offset in that
                           object, d = nbytes
    then the pickle stream; then inline buffers, each 64-byte aligned

A frame of a page or more owns whole pages (``RawStore.create``), so a write
to one of its buffers copies no other object's bytes.  Its buffers are not
page-aligned within it: that would cost up to a page per buffer, and all it
would buy is that ``put`` of a view whose neighbour in the same frame was
written refers to it instead of copying it.
"""

from __future__ import annotations

import copy
import io
import pickle
import struct
import time
import warnings
from multiprocessing.reduction import ForkingPickler

import numpy as np

from ._errors import (
    ObjectNotFoundError,
    ObjectStateError,
    SerializationError,
    StoreFullError,
)
from ._store import ObjectRef, RawStore, StoreStatistics

__all__ = ["ObjectStore", "StoreFullWarning", "DEFAULT_THRESHOLD", "writable"]

#: Buffers of a message at or above this size go through the store; smaller
#: ones are pickled in-band.  Below it, a copy into the pipe costs less than
#: a store object (a lock round trip, a slot, a finalizer: about 30 us);
#: benchmarks/bench_threshold.py measures the crossover.
DEFAULT_THRESHOLD = 256 * 1024

_FRAME_MAGIC = 0x31464853            # b"SHF1"
_FRAME_HEADER = struct.Struct("IIQ")     # native, as the store's own layout
_ENTRY = struct.Struct("QQQQQ")
_INLINE, _EXTERNAL = 0, 1
_MSG_INBAND, _MSG_REF, _MSG_BORROWED = b"I", b"R", b"B"
_MSG_REF_BODY = struct.Struct("<QIQ")


class StoreFullWarning(RuntimeWarning):
    """A value was sent in-band because the store had no room for it."""


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def _memoryview_from(buf, fmt: str, shape: tuple[int, ...]) -> memoryview:
    view = memoryview(buf).cast("B")
    return view.cast(fmt, shape) if fmt != "B" or len(shape) != 1 else view


def _reduce_memoryview(view: memoryview):
    if view.c_contiguous:
        return _memoryview_from, (pickle.PickleBuffer(view), view.format, view.shape)
    return _memoryview_from, (view.tobytes(), view.format, view.shape)


def _rebuild_ndarray(buf, dtype: np.dtype, shape: tuple[int, ...], order: str) -> np.ndarray:
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


def _reduce_ndarray(arr: np.ndarray):
    # numpy's own reducer pickles some arrays in-band, as a copy: those that
    # are neither C- nor F-contiguous, and datetime/timedelta ones.  Every
    # array without Python objects goes out of band here (a non-contiguous
    # one is made C-contiguous first: same values, C order).
    if arr.dtype.hasobject:
        return arr.__reduce_ex__(5)
    if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
        arr = np.ascontiguousarray(arr)
    order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
    # datetime64/timedelta64 export no buffer; their bytes are int64s.
    data = arr.view(np.int64) if arr.dtype.kind in "mM" else arr
    try:
        buffer = pickle.PickleBuffer(data)
    except (ValueError, BufferError):      # a dtype numpy cannot export
        return arr.__reduce_ex__(5)
    return _rebuild_ndarray, (buffer, arr.dtype, arr.shape, order)


#: shmpool's own reductions: they hand array and memoryview buffers out of
#: band, so they win over any other reduction registered for these types.
_BUFFER_REDUCERS = {memoryview: _reduce_memoryview, np.ndarray: _reduce_ndarray}


def _dispatch_table() -> dict:
    """The reductions a pickle uses, as ``multiprocessing`` would pick them:
    copyreg's, then those registered with
    ``multiprocessing.reduction.ForkingPickler.register`` (connections,
    sockets, bound methods, and whatever a library adds, PyTorch's tensors
    for one), then shmpool's for buffers.

    Built anew for every pickle, as ``ForkingPickler`` itself does, because
    a reduction may be registered at any time; copying the few entries costs
    under a microsecond, less than creating the pickler.
    """
    table = ForkingPickler._copyreg_dispatch_table.copy()
    table.update(ForkingPickler._extra_reducers)
    table.update(_BUFFER_REDUCERS)
    return table


class _Pickler(pickle.Pickler):
    """Protocol 5 with the reductions of ``_dispatch_table()``."""

    def __init__(self, file, **kwargs) -> None:
        super().__init__(file, protocol=5, **kwargs)
        self.dispatch_table = _dispatch_table()


def _address(raw: memoryview) -> int:
    return np.frombuffer(raw, np.uint8).__array_interface__["data"][0]


def _freeze(obj) -> None:
    """Make an ndarray (and the ndarrays it views) read-only after sealing."""
    while isinstance(obj, np.ndarray):
        obj.flags.writeable = False
        obj = obj.base


class ObjectStore:
    """A shared-memory store of Python objects.

    The constructing process owns the store: its memory is freed when the
    owner closes it or exits, and nothing is left in ``/dev/shm`` even if
    the owner is killed.  Pass the store to other processes as a ``Process``
    argument or Pool ``initargs`` (fork children inherit it); they can then
    ``get`` refs made anywhere and ``put`` their own.

    Args:
        capacity: bytes of shared memory at most (default: the free space of
            /dev/shm).  Memory is reserved only as it is used.
        threshold: message buffers at or above this many bytes go through
            the store; smaller ones are pickled in-band.
        max_objects: size of the object table.
        space_timeout: seconds to wait for space before failing (``put``)
            or falling back to an in-band copy (``encode``).
        readonly: hand out sealed, read-only views (numpy refuses writes)
            instead of copy-on-write ones.  Recorded in the store, so every
            process attached to it agrees.

    Thread- and process-safe.
    """

    def __init__(self, capacity: int | None = None, *, threshold: int = DEFAULT_THRESHOLD,
                 max_objects: int | None = None, space_timeout: float | None = None,
                 readonly: bool = False) -> None:
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        kwargs = {} if space_timeout is None else {"space_timeout": space_timeout}
        self._init(RawStore(capacity, max_objects=max_objects, readonly=readonly, **kwargs),
                   threshold)

    def _init(self, raw: RawStore, threshold: int) -> None:
        self.raw = raw
        self.threshold = threshold
        self._warned_full = False

    @classmethod
    def _attach(cls, raw: RawStore, threshold: int) -> "ObjectStore":
        store = cls.__new__(cls)
        store._init(raw, threshold)
        return store

    def __reduce__(self):
        return (ObjectStore._attach, (self.raw, self.threshold))

    @property
    def token(self) -> int:
        return self.raw.token

    @property
    def readonly(self) -> bool:
        """True if ``get`` and ``decode`` hand out read-only views."""
        return self.raw.readonly

    # -- pickling ----------------------------------------------------------

    def _pickle(self, obj, threshold: int):
        """Pickle *obj*; return the stream and its out-of-band buffers as
        ``(kind, ...)`` entries.  Nothing is allocated in the store."""
        entries = []
        raw_store = self.raw

        def on_buffer(pb: pickle.PickleBuffer) -> bool:
            # pickle's contract: a *false* return means "out of band".
            try:
                raw = pb.raw()
            except BufferError:                 # not contiguous: pickle copies it
                return True
            nbytes = raw.nbytes
            if not nbytes:
                return True
            found = raw_store.locate(_address(raw), nbytes) if raw_store.has_views else None
            if found is not None and raw_store.state_of(found[0]) == "created":
                try:
                    raw_store.seal(found[0])
                    _freeze(raw.obj)
                except ObjectStateError:      # another process is creating it
                    found = None              # (a fork child's inherited array): copy
            if found is not None:
                ref, offset = found
                entries.append((_EXTERNAL, ref, offset, nbytes))
                return False
            if nbytes < threshold:
                return True
            entries.append((_INLINE, raw))
            return False

        # The stream starts with the in-band message tag, so that an in-band
        # message is the stream itself: no further copy.
        stream = io.BytesIO()
        stream.write(_MSG_INBAND)
        try:
            _Pickler(stream, buffer_callback=on_buffer).dump(obj)
        except Exception as exc:
            raise SerializationError(
                f"cannot pickle {type(obj).__qualname__} object for the "
                f"shared-memory store: {exc}") from exc
        return stream, entries

    def _write_frame(self, header: memoryview, entries, timeout) -> ObjectRef:
        table_end = _FRAME_HEADER.size + _ENTRY.size * len(entries)
        offset = _round_up(table_end + header.nbytes, 64)
        placed = []
        deps: dict[ObjectRef, None] = {}
        for entry in entries:
            if entry[0] == _INLINE:
                placed.append((_INLINE, offset, entry[1].nbytes, 0, 0))
                offset = _round_up(offset + entry[1].nbytes, 64)
            else:
                _, ref, at, nbytes = entry
                deps[ref] = None
                placed.append((_EXTERNAL, ref.slot, ref.generation, at, nbytes))
        builder = self.raw.create(offset, depends_on=tuple(deps), timeout=timeout)
        with builder:
            view = builder.view
            _FRAME_HEADER.pack_into(view, 0, _FRAME_MAGIC, len(entries), header.nbytes)
            for i, fields in enumerate(placed):
                _ENTRY.pack_into(view, _FRAME_HEADER.size + _ENTRY.size * i, *fields)
            view[table_end:table_end + header.nbytes] = header
            for entry, fields in zip(entries, placed):
                if entry[0] == _INLINE:
                    view[fields[1]:fields[1] + fields[2]] = entry[1]
        return builder.ref

    def _read_frame(self, ref: ObjectRef):
        # A frame under a page comes read-only and held (its dependencies
        # are read through it); its inline buffers are then copied, so that
        # a copy-on-write store hands out writable values whatever the size.
        view = self.raw.get(ref, copy_small=False)
        copy_inline = view.readonly and not self.raw.readonly
        magic, count, plen = _FRAME_HEADER.unpack_from(view, 0)
        if magic != _FRAME_MAGIC:
            raise SerializationError(f"{ref!r} holds raw bytes, not an object put() stored")
        buffers = []
        for i in range(count):
            kind, a, b, c, d = _ENTRY.unpack_from(view, _FRAME_HEADER.size + _ENTRY.size * i)
            if kind == _INLINE:
                buffers.append(bytearray(view[a:a + b]) if copy_inline else view[a:a + b])
            else:
                inner = self.raw.get_dependency(ref, ObjectRef(ref.token, a, b))
                buffers.append(inner[c:c + d])
        start = _FRAME_HEADER.size + _ENTRY.size * count
        try:
            return pickle.loads(view[start:start + plen], buffers=buffers)
        except Exception as exc:
            raise SerializationError(f"cannot unpickle the object behind {ref!r}: {exc}") from exc

    # -- objects -----------------------------------------------------------

    def put(self, obj, *, timeout: float | None = None) -> ObjectRef:
        """Store *obj* sealed; return an owning ref.

        Every out-of-band buffer goes into the store, whatever its size, so
        ``get`` returns zero-copy arrays.  A buffer that is a view of this
        store is referred to, not copied, unless a page of it was written
        in this process.  The object lives while the returned ref (or any
        view from ``get``) lives.

        Raises:
            SerializationError: *obj* cannot be pickled.
            StoreFullError: no room for it within *timeout* seconds.
        """
        stream, entries = self._pickle(obj, threshold=1)
        return self._write_frame(stream.getbuffer()[1:], entries, timeout)

    def get(self, ref: ObjectRef):
        """Rebuild the object behind *ref*.  Arrays and buffers are views of
        shared memory that keep the object alive while they live: writable
        copy-on-write (a write copies the written pages into this process;
        nobody else sees it), or read-only in a ``readonly`` store.  Buffers
        of objects under a page arrive as private copies."""
        return self._read_frame(ref)

    def release(self, ref: ObjectRef) -> None:
        """Drop the hold the owning *ref* keeps now (views stay valid)."""
        self.raw.release(ref)

    def delete(self, ref: ObjectRef) -> None:
        """Make the object unreachable by ``get``; drop *ref*'s hold."""
        self.raw.delete(ref)

    def contains(self, ref: ObjectRef) -> bool:
        return self.raw.contains(ref)

    def statistics(self) -> StoreStatistics:
        return self.raw.statistics()

    def empty(self, shape, dtype=float, order: str = "C") -> np.ndarray:
        """A new writable, uninitialised array that lives in the store.

        ``put`` (or returning it from a task) seals it without a copy, and
        the array turns read-only.  Dropped unsealed, its memory is freed.
        """
        dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise TypeError(
                f"cannot place an array of dtype {dtype} in shared memory: it "
                f"holds Python objects (use put() to store it)")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if any(n < 0 for n in shape):
            raise ValueError(f"negative dimensions are not allowed: {shape}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        builder = self.raw.create(nbytes)
        return np.ndarray(shape, dtype=dtype, buffer=builder.view, order=order)

    def zeros(self, shape, dtype=float, order: str = "C") -> np.ndarray:
        """Like ``empty``, filled with zeros."""
        arr = self.empty(shape, dtype, order)
        arr.fill(0)
        return arr

    # -- messages ----------------------------------------------------------

    def encode(self, obj) -> bytes:
        """Serialize *obj* into a message for a pipe (see module docstring).

        A message naming a store object carries one retained count: hand it
        to ``decode`` exactly once, or to ``discard`` if it is never read.
        """
        message, owned = self._encode(obj, _MSG_REF)
        if owned is not None:
            self.raw.retain(owned)
        return message

    def encode_held(self, obj) -> tuple[bytes, ObjectRef | None]:
        """Like ``encode``, but the message holds nothing: the sender keeps
        the returned owning ref (None for an in-band message) until the
        receiver is done, then drops it.  Nothing leaks if the receiver dies.
        """
        return self._encode(obj, _MSG_BORROWED)

    def encode_bounded(self, obj, limit: int) -> tuple[bytes, ObjectRef | None]:
        """Like ``encode_held``, but the message is at most *limit* bytes:
        a value whose pickle is longer goes into the store even if all its
        buffers are small.  No in-band fallback: if the store stays full for
        ``space_timeout`` seconds, StoreFullError.  For channels that carry
        fixed-size records (the queues); ``hand_over`` makes the message
        ready to send."""
        return self._encode(obj, _MSG_BORROWED, limit)

    def hand_over(self, message: bytes) -> bytes:
        """Add the retained count that a message from ``encode_bounded`` (or
        ``encode_held``) needs to outlive its sender, and return the message
        to send: afterwards it reads like one from ``encode``, and the sender
        drops its ref once it is sent (or calls ``discard`` if it is not)."""
        if not self.is_held_message(message):
            return message
        self.raw.retain(self._message_ref(_MSG_BORROWED, memoryview(message)[1:]))
        return _MSG_REF + message[1:]

    def _encode(self, obj, kind: bytes,
                limit: int | None = None) -> tuple[bytes, ObjectRef | None]:
        stream, entries = self._pickle(obj, self.threshold)
        inband = stream.tell() <= (self.threshold if limit is None else min(limit, self.threshold))
        if not entries and inband:
            return stream.getvalue(), None
        header = stream.getbuffer()[1:]
        try:
            # With a fallback at hand, wait for space only if it can come.
            owned = self._write_frame(header, entries, timeout=None if limit is not None else 0)
        except StoreFullError as exc:
            if limit is not None:
                raise
            owned = self._write_when_freed(header, entries)
            if owned is None:
                return self._fallback(obj, exc), None
        return kind + _MSG_REF_BODY.pack(owned.token, owned.slot, owned.generation), owned

    def _write_when_freed(self, header, entries) -> ObjectRef | None:
        """Retry the frame while space may still be freed, for at most the
        store's ``space_timeout``; None as soon as no holder can free any."""
        deadline = time.monotonic() + self.raw.space_timeout
        delay = 0.001
        while self._waiting_can_free() and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
            try:
                return self._write_frame(header, entries, timeout=0)
            except StoreFullError:
                pass
        return None

    def _waiting_can_free(self) -> bool:
        """True if waiting may bring space: this process is the store's
        owner (the pool's parent) and some other process holds objects now
        (a worker's views of its arguments, an answer not yet acknowledged),
        which it lets go of by itself.  What the owner holds alone are
        mostly results its caller keeps, which no wait gets back.

        Any other process (a worker) never waits: the objects it could wait
        for are answers of workers that may be waiting too (each holds its
        own until the owner's acknowledgement, which it reads only after
        sending), or the owner's, released only by the owner's caller."""
        return self.raw.owned_here and self.raw.held_by_others()

    def _fallback(self, obj, exc: StoreFullError) -> bytes:
        count = self.raw.record_fallback()
        if not self._warned_full:
            self._warned_full = True
            warnings.warn(
                f"the shared-memory store is full; sending values in-band "
                f"instead (fallback #{count}; {exc}). Pass a larger capacity= "
                f"or release results sooner",
                StoreFullWarning, stacklevel=3)
        stream = io.BytesIO()
        stream.write(_MSG_INBAND)
        _Pickler(stream).dump(obj)
        return stream.getvalue()

    def decode(self, message: bytes):
        """Rebuild the object of a message made by ``encode`` (in any
        process attached to this store), adopting its retained count."""
        kind, body = bytes(message[:1]), memoryview(message)[1:]
        if kind == _MSG_INBAND:
            try:
                return pickle.loads(body)
            except Exception as exc:
                raise SerializationError(f"cannot unpickle an in-band message: {exc}") from exc
        ref = self._message_ref(kind, body)
        return self._read_frame(self.raw.adopt(ref) if kind == _MSG_REF else ref)

    @staticmethod
    def is_held_message(message) -> bool:
        """True if *message* (from ``encode_held``) names an object its
        sender holds for the receiver."""
        return bytes(message[:1]) == _MSG_BORROWED

    def discard(self, message: bytes) -> None:
        """Release what an undelivered message holds in the store."""
        kind, body = bytes(message[:1]), memoryview(message)[1:]
        if kind == _MSG_REF:
            self.raw.release_retained(self._message_ref(kind, body))

    def _message_ref(self, kind: bytes, body: bytes) -> ObjectRef:
        if kind not in (_MSG_REF, _MSG_BORROWED) or len(body) != _MSG_REF_BODY.size:
            raise SerializationError(f"not a shmpool message (starts with {bytes(kind)!r})")
        token, slot, gen = _MSG_REF_BODY.unpack(body)
        if token != self.token:
            raise ObjectNotFoundError(f"the message names an object of another store ({token:#x})")
        return ObjectRef(token, slot, gen)

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Detach this process (the owner: free the store once every process
        has).  Views already handed out stay valid, each holding its object
        until it is dropped.  Idempotent."""
        self.raw.close()

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def __enter__(self) -> "ObjectStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def writable(obj):
    """Return a private, writable deep copy of *obj* (arrays, frames, nested
    containers); the store is not involved and nothing is shared.

    Values from a store are writable already (copy-on-write, which copies
    only the pages written); this is for a ``readonly=True`` store, or to
    get a copy that owns all its memory up front."""
    if isinstance(obj, memoryview):
        return _memoryview_from(bytearray(obj.tobytes()), obj.format, obj.shape)
    return copy.deepcopy(obj)
