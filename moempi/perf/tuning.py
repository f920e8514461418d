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


def simulate(layer_s: Callable[[int], float], counts: list[int], trial_layers: int,
             moe_executions: int, share: float = BUDGET_SHARE) -> tuple[int, float, dict, str]:
    """The tuner's rules on layer times ``layer_s(m)``: ``(chosen, cost_s, tried, reason)``.

    The smallest count is timed on one layer; its time ``t`` x ``moe_executions`` (MoE
    layers x batches) is the job's MoE work, ``share`` of it the budget.  Each next count
    runs one more layer while the trials' excess so far plus :data:`PRIOR` x ``t`` fits the
    budget and a layer is left (``trial_layers`` in all, the seed's included); a count not
    faster than the best by :data:`TIE` ends the climb.  ``cost_s``: the trial layers' time
    over the chosen count's (the run's synchronisations left out); ``tried``: count ->
    seconds."""
    counts = sorted(counts)
    seed, rest = counts[0], counts[1:]
    if not rest or trial_layers < 1:
        return seed, 0.0, {}, "one candidate count" if not rest else "fewer than 2 MoE layers"
    tried = {seed: layer_s(seed)}
    best, t_best = seed, tried[seed]
    budget = share * t_best * moe_executions
    reason = "every candidate tried"
    for m in rest:
        spent = sum(t - t_best for t in tried.values())
        if len(tried) >= trial_layers:
            reason = "no MoE layer left in the first batch"
            break
        if spent + PRIOR * t_best > budget:
            reason = (f"the next trial could cost more than the budget, {share:.0%} of the "
                      f"forecast MoE work")
            break
        tried[m] = layer_s(m)
        if tried[m] < t_best * (1 - TIE):
            best, t_best = m, tried[m]
        else:
            reason = f"{m} micro-batches were no faster than {best}"
            break
    return best, max(sum(t - t_best for t in tried.values()), 0.0), tried, reason


__all__ = ["BUDGET_SHARE", "CANDIDATES", "PRIOR", "TIE", "candidates", "simulate"]
