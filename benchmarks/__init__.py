"""shmpool's benchmark suite: every workload, against every installed peer.

Run it from the repository root::

    python -m benchmarks            # the full run (about 8 minutes on 2 cores)
    python -m benchmarks --quick    # fewer repeats, smaller counts (under 2 minutes)

Modules, one job each:

- ``peers``: one adapter class per library (pools, executors, joblib, Ray,
  queues) behind one interface, and whether it is installed;
- ``tasks``: the module-level functions the workers run;
- ``workloads``: W1-W10, each a list of figures that know how to time one run;
- ``measure``: warm-up, repeats in rotating order, medians with min-max;
- ``limits``: the machine's own limits (memcpy, first touch, a pipe round trip);
- ``targets``: the goals each figure is checked against;
- ``system``: the machine, versions, load, the parent's memory, leftovers;
- ``report``: the markdown table, the JSON file and the chart;
- ``progress``: a progress bar on stderr;
- ``suite``: one run: start the peers, measure each figure, stop them;
- ``__main__``: the command line;
- ``area``: the command line of the per-area scripts, ``bench_pool.py``,
  ``bench_executor.py`` and ``bench_queue.py``: a few of the suite's
  figures on a few of its peers, measured and reported by the code above.

``bench_store.py`` and ``bench_threshold.py`` measure single layers (the
store's put/get, where a message should go through the store) with the
same measuring rules.
"""
