"""What a run reports: its history (curves, delays), progress lines and the summary."""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .server import Server


@dataclass
class History:
    """What a run has seen, kept across resumes (checkpointed).

    Attributes:
        curve: ``(seconds, version, training-loss EMA)`` after every update.
        evals: ``(seconds, version, task metric)`` at every evaluation.
        delay_hist: delay of every gradient that reached the policy -> count.
        loss_ema: EMA (0.9) of the accepted gradients' training loss, NaN before any.
    """

    curve: list[tuple[float, int, float]] = field(default_factory=list)
    evals: list[tuple[float, int, float]] = field(default_factory=list)
    delay_hist: Counter = field(default_factory=Counter)
    loss_ema: float = math.nan

    def add_loss(self, loss: float) -> None:
        self.loss_ema = loss if math.isnan(self.loss_ema) else 0.9 * self.loss_ema + 0.1 * loss

    def state_dict(self) -> dict[str, Any]:
        return {"curve": list(self.curve), "evals": list(self.evals), "delay_hist": dict(self.delay_hist),
                "loss_ema": self.loss_ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.curve = [(float(t), int(v), float(x)) for t, v, x in state["curve"]]
        self.evals = [(float(t), int(v), float(x)) for t, v, x in state["evals"]]
        self.delay_hist = Counter({int(k): int(c) for k, c in state["delay_hist"].items()})
        self.loss_ema = math.nan if state["loss_ema"] is None else float(state["loss_ema"])


def progress_line(server: "Server", method: str, started: float) -> str:
    """One line of progress: version, update rate, accepted/discarded, per-worker rates."""
    elapsed = max(time.monotonic() - started, 1e-9)
    totals = server.totals
    v = server.policy.version
    done = totals["accepted"] + totals["stale"] + totals["nonfinite"] + totals["dropped"]
    rate = (done - totals["accepted"]) / done if done else 0.0
    loss = "-" if math.isnan(server.history.loss_ema) else f"{server.history.loss_ema:.3f}"
    per_worker = " ".join(f"{ws.pushed / elapsed:.1f}" for ws in server.ws)
    return (f"[ringmaster {method}] t={server.now():6.1f}s version={v} upd/s={(v - server.version_at_start) / elapsed:6.1f} "
            f"accepted={totals['accepted']} discarded={done - totals['accepted']} ({rate:.0%}) "
            f"cancelled={sum(ws.cancelled for ws in server.ws)} grads/s per worker=[{per_worker}] train loss={loss}")


def summary(server: "Server", *, method: str, wall: float, elapsed_total: float, totals_before: Counter,
            metric_name: str) -> dict:
    """Everything measured by a run as a JSON-ready dict.

    Counts under ``totals`` are this run's (a resumed run adds its predecessors' in
    ``totals_including_resumed``); ``accounting_ok`` checks
    ``pushed == accepted + stale + nonfinite + dropped + in_flight``. ``server`` holds the
    server's overhead (queue, policy decision, bookkeeping: its busy time minus the update
    math and the parameter publication) per record and per update, in wall time and in the
    server thread's CPU time (wall time also counts waits for the GIL and for a loaded CPU).
    ``final_loss`` / ``initial_loss`` are the task's held-out metric (``metric``).
    """
    totals = server.run_totals()
    pushed, discarded = totals["pushed"], totals["discarded"]
    stats = server.queue.stats()
    policy = server.policy
    updates = policy.version - server.version_at_start
    per_worker = []
    for i, (ws, body) in enumerate(zip(server.ws, server.bodies)):
        per_worker.append({
            "worker": i, "body": repr(body), "status": ws.fate or ws.phase, "jobs": ws.jobs, "pushed": ws.pushed,
            "accepted": ws.accepted, "discarded": ws.discarded, "cancelled": ws.cancelled,
            "gradients_per_s": ws.pushed / wall if wall > 0 else 0.0,
            "jobs_per_s": ws.jobs / wall if wall > 0 else 0.0,
            "seconds_per_gradient": ws.compute_s / ws.computed if ws.computed else None,
            "mean_delay": ws.delay_sum / ws.arrivals if ws.arrivals else None, "error": ws.error,
        })
    timing = server.timing
    records = totals["accepted"] + discarded
    overhead = timing["busy"] - timing["math"] - timing["publish"]
    overhead_cpu = timing["busy_cpu"] - timing["math_cpu"] - timing["publish_cpu"]
    combined = Counter(totals_before)
    combined.update(totals)
    history = server.history
    return {
        "method": method,
        "policy": policy.hyperparameters(),
        "workers": server.n,
        "stop_reason": server.stop_reason,
        "wall_time_s": wall,
        "elapsed_including_resumed_s": elapsed_total,
        "version": policy.version,
        "updates": updates,
        "updates_per_s": updates / wall if wall > 0 else 0.0,
        "totals": totals,
        "totals_including_resumed": dict(combined),
        "queue_pushed": stats["pushed"],
        "accounting_ok": pushed == stats["pushed"] == totals["accepted"] + discarded + totals["in_flight"],
        "discard_rate": discarded / pushed if pushed else 0.0,
        "per_worker": per_worker,
        "delay_histogram": {str(k): v for k, v in sorted(history.delay_hist.items())},
        "server": {
            "records": records,
            "overhead_us_per_record": 1e6 * overhead / records if records else None,
            "overhead_us_per_update": 1e6 * overhead / updates if updates else None,
            "overhead_cpu_us_per_update": 1e6 * overhead_cpu / updates if updates else None,
            "math_ms_per_update": 1e3 * timing["math"] / updates if updates else None,
            "publish_us_per_update": 1e6 * timing["publish"] / updates if updates else None,
        },
        "metric": metric_name,
        "final_loss": history.evals[-1][2] if history.evals else None,
        "initial_loss": history.evals[0][2] if history.evals else None,
        "train_loss_ema": None if math.isnan(history.loss_ema) else history.loss_ema,
        "curve": history.curve,
        "evals": history.evals,
        "faults": server.fault_log,
    }


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as aligned text: the first column left-aligned, the others right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def json_ready(value: Any) -> Any:
    """``value`` with every non-finite float (a diverged run, an unreached time) as ``None``
    and tensors as lists: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "tolist"):  # tensors, numpy arrays and scalars
        return json_ready(value.tolist())
    return value
