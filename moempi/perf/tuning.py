"""How ``moempi run`` chooses its micro-batch count, as rules the time model can follow.

The run times candidate counts on real MoE layers of its first batch
(:func:`moempi.runtime.tune.tuned_batch`); :func:`simulate` applies the same rules to the
model's layer times, so that ``moempi plan`` predicts the count the run will choose and
what choosing it costs, instead of assuming the best count for free.
"""

from __future__ import annotations

from typing import Callable

CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16)
TIE = 0.02                   # a count must be this much faster than the best so far to win
BUDGET_SHARE = 0.02          # the tuning may cost this share of the job's forecast MoE work
PRIOR = 3.0                  # an untried count may cost this many layers more: measured, 2
                             # micro-batches took 3.8 x one at hidden 64 (2 ranks, 2 cores)
MIN_ROWS = 16                # no micro-batches of fewer rows (their fixed costs dominate)


def candidates(rows: int, most: int) -> list[int]:
    """The micro-batch counts worth timing for ``rows`` tokens per rank: at most ``most``,
    and none with micro-batches of fewer than :data:`MIN_ROWS` rows."""
    keep = [m for m in CANDIDATES if m <= most and (m == 1 or rows // m >= MIN_ROWS)]
    return keep or [1]


class Climb:
    """The tuner's rules, one decision at a time; ``moempi run``'s tuner
    (:func:`moempi.runtime.tune.tuned_batch`) and :func:`simulate` both follow them.

    The smallest of ``counts`` was timed on one MoE layer (``seed_s``); that time x
    ``moe_executions`` (MoE layers x batches) is the job's MoE work, ``share`` of it the
    budget.  :meth:`next` gives the next count to try, or None: when none is left, no MoE
    layer is left, or the trials' excess so far plus :data:`PRIOR` x the best time could
    pass the budget; :meth:`record` takes its time, and a count not faster than the best by
    :data:`TIE` ends the climb."""

    def __init__(self, counts: list[int], seed_s: float, moe_executions: int,
                 share: float = BUDGET_SHARE):
        counts = sorted(counts)
        self.rest = counts[1:]
        self.times = {counts[0]: [seed_s]}
        self.best, self.t_best = counts[0], seed_s
        self.budget = share * seed_s * moe_executions
        self.share = share
        self.reason = "every candidate tried"

    @property
    def cost_s(self) -> float:
        """The trial layers' time over the best count's."""
        return max(sum(t - self.t_best for ts in self.times.values() for t in ts), 0.0)

    def next(self, layer_left: bool) -> int | None:
        if not self.rest:
            return None
        if not layer_left:
            self.reason = "no MoE layer left in the first batch"
            return None
        if self.cost_s + PRIOR * self.t_best > self.budget:
            self.reason = (f"the next trial could cost more than the budget, "
                           f"{self.share:.0%} of the forecast MoE work")
            return None
        return self.rest[0]

    def record(self, m: int, seconds: float) -> None:
        self.rest.remove(m)
        self.times.setdefault(m, []).append(seconds)
        if seconds < self.t_best * (1 - TIE):
            self.best, self.t_best = m, seconds
        else:
            self.reason = f"{m} micro-batches were no faster than {self.best}"
            self.rest = []


def simulate(layer_s: Callable[[int], float], counts: list[int], trial_layers: int,
             moe_executions: int, share: float = BUDGET_SHARE) -> tuple[int, float, dict, str]:
    """The tuner's rules (:class:`Climb`) on layer times ``layer_s(m)``, with
    ``trial_layers`` MoE layers to try counts on (the seed's included): ``(chosen, cost_s,
    tried, reason)``; ``cost_s`` leaves out the run's synchronisations, ``tried`` maps a
    count to its seconds."""
    counts = sorted(counts)
    if len(counts) < 2 or trial_layers < 1:
        return counts[0], 0.0, {}, ("one candidate count" if len(counts) < 2
                                    else "fewer than 2 MoE layers")
    climb = Climb(counts, layer_s(counts[0]), moe_executions, share)
    while (m := climb.next(len(climb.times) < trial_layers)) is not None:
        climb.record(m, layer_s(m))
    return (climb.best, climb.cost_s, {m: ts[0] for m, ts in climb.times.items()},
            climb.reason)


__all__ = ["BUDGET_SHARE", "CANDIDATES", "Climb", "PRIOR", "TIE", "candidates", "simulate"]
