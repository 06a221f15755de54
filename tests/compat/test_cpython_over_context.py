"""CPython's own Pool tests, run against the standard library's Pool over
shmpool's context.

``multiprocessing.pool.Pool(context=shmpool.get_context(method))`` is the
standard library's Pool whose task and result queues are shmpool's
SimpleQueues (through their ``_reader``/``_writer`` ends).  The classes
``_TestPool``, ``_TestPoolWorkerErrors`` and ``_TestPoolWorkerLifetime`` of
the running interpreter's ``Lib/test/_test_multiprocessing.py`` run
unedited (``_cpython_multiprocessing_harness``), e.g.
``OnShmpoolContextTestPool_spawn::test_imap``; ``EXCLUDED_ON_CONTEXT.md``
lists the tests skipped.
"""

from _cpython_multiprocessing_harness import POOL_BASES, cases_of

globals().update(cases_of(POOL_BASES, on_context=True))
