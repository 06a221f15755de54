"""CPython's own queue tests, run against shmpool's queues.

``_TestQueue`` (Queue and JoinableQueue) and ``TestSimpleQueue`` come from
the running interpreter's ``Lib/test/_test_multiprocessing.py``, unedited;
``_cpython_multiprocessing_harness`` wires them to shmpool under each start method
(see its docstring), and ``EXCLUDED.md`` lists the tests skipped, each with
its reason.
"""

from _cpython_multiprocessing_harness import QUEUE_BASES, cases_of

globals().update(cases_of(QUEUE_BASES))
