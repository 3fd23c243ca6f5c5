"""Reproduce the Ringmaster LMO paper's quadratic figure at the paper's scale.

n = 6174 workers (worker i takes 1 + sqrt(i-1) + |N(0, i)| per gradient), d = 1729,
horizon 2000, all six methods at the tuned values in
``ringmaster_kernels.runtime.experiments.TUNED``; prints the table (and the wall time)
and writes ||grad f||^2 vs virtual time to ``--plot``. Extra arguments go to
``ringmaster simulate quadratic`` (e.g. ``--tune`` to redo the grid search, ``--json``).

    python python/paper_quadratic.py --plot paper_quadratic.png
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ringmaster_kernels.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--plot" not in argv:
        argv += ["--plot", "paper_quadratic.png"]
    if "--jobs" not in argv:
        argv += ["--jobs", "0"]  # the six runs are independent: one process per core
    sys.exit(main(["simulate", "quadratic", *argv]))
