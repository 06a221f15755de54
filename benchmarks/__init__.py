"""shmpool's benchmark suite: every workload, against every installed peer.

Run it from the repository root::

    python -m benchmarks            # the full run (about 8 minutes on 2 cores)
    python -m benchmarks --quick    # fewer repeats, smaller counts (under 2 minutes)

Modules, one job each:

- ``peers``: one adapter class per library (pools, executors, joblib, Ray,
  queues) behind one interface, and whether it is installed;
- ``tasks``: the module-level functions the workers run;
- ``workloads``: W1-W7, each a list of figures that know how to time one run;
- ``measure``: warm-up, repeats in rotating order, medians with min-max;
- ``limits``: the machine's own limits (memcpy, first touch, a pipe round trip);
- ``targets``: the goals each figure is checked against;
- ``system``: the machine, versions, load, the parent's memory, leftovers;
- ``report``: the markdown table, the JSON file and the chart;
- ``progress``: a progress bar on stderr;
- ``__main__``: the command line.

The single-purpose scripts beside them (``bench_pool.py``, ``bench_queue.py``,
``bench_store.py``, ``bench_threshold.py``) still run on their own.
"""
