"""The error tree: stdlib bases, pickling across processes, messages."""

import concurrent.futures
import concurrent.futures.process
import pickle

import pytest

import shmpool
from shmpool import _errors

ALL_ERRORS = [getattr(_errors, name) for name in _errors.__all__
              if name != "WorkerDiedError"]


def test_worker_died_error_pickles_and_names_pid_and_signal():
    err = pickle.loads(pickle.dumps(shmpool.WorkerDiedError(4242, -9)))
    assert (err.pid, err.exitcode) == (4242, -9)
    assert "4242" in str(err) and "SIGKILL" in str(err)
    assert isinstance(err, concurrent.futures.process.BrokenProcessPool)


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_every_error_pickles_with_its_message(cls):
    err = cls("store of 1024 bytes is full")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert str(back) == "store of 1024 bytes is full"
    assert isinstance(back, shmpool.ShmpoolError)


@pytest.mark.parametrize("cls, stdlib_base", [
    (shmpool.ObjectNotFoundError, KeyError),
    (shmpool.StoreFullError, MemoryError),
    (shmpool.SerializationError, pickle.PicklingError),
])
def test_new_errors_are_caught_by_the_stdlib_except_clauses(cls, stdlib_base):
    with pytest.raises(stdlib_base):
        raise cls("x")


def test_object_not_found_message_is_not_quoted_like_a_key():
    assert str(shmpool.ObjectNotFoundError("ref is stale")) == "ref is stale"


def test_errors_are_not_confused_with_broken_executor():
    assert not issubclass(shmpool.StoreError, concurrent.futures.BrokenExecutor)
