"""Reproduce the Ringmaster LMO paper's quadratic figure at the paper's scale.

n = 6174 workers (worker i takes 1 + sqrt(i-1) + |N(0, i)| per gradient), d = 1729,
horizon 2000, all six methods at the values tuned at this scale on the sustained time to
target (``ringmaster_kernels.runtime.experiments.TUNED``, tuned on seed 0), reported on
5 seeds (1..5) by default; prints per method the median and [min, max] of the sustained
time, first hit, final and last-quarter median (and the wall time), and writes the
median ||grad f||^2 curve with a min-max band vs virtual time to ``--plot``. Extra
arguments go to ``ringmaster simulate quadratic`` (e.g. ``--seeds 10``, ``--tune`` to redo
the grid search, ``--json``).

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
    if "--seeds" not in argv:
        argv += ["--seeds", "5"]
    if "--jobs" not in argv:
        argv += ["--jobs", "0"]  # the runs are independent: one process per core
    sys.exit(main(["simulate", "quadratic", *argv]))
