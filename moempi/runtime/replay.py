"""The exchanges replayed alone after the forward pass, for the overlap % (``pure_comm``).

Replaying every MoE layer's exchanges costs about what the exchanges took in the run: at H
1024 / F 256, 4096 tokens per rank and one micro-batch, 40 % of the layer (150.6 ms per
layer with the replay, 107.6 ms without, 2 ranks on the 2-core development VM).  So by
default (``pipeline.pure_comm_layers = "sample"``) a sample of layers is replayed, spread
over the stack (the middle MoE layer first, then the middles of the halves, ...), while the
replays' forecast time stays within ``share`` (2 %) of the forward; each other MoE layer's
``pure_comm`` is estimated from its rows at the replayed layers' seconds per row (recorded
as estimated).  ``"all"`` replays every MoE layer.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

SHARE = 0.02


def spread(n: int) -> list[int]:
    """``range(n)`` in the order that samples it evenly: middle first, then the halves' middles."""
    order, seen, parts = [], set(), [(0, n)]
    while parts:
        nxt = []
        for a, b in parts:
            if a >= b:
                continue
            mid = (a + b) // 2
            if mid not in seen:
                seen.add(mid)
                order.append(mid)
            nxt += [(a, mid), (mid + 1, b)]
        parts = nxt
    return order


def replay_pure_comm(world: MPI.Comm, exchanger, tel, moe_layers: list[int], num_layers: int,
                     mode: str, forward_s: float, share: float = SHARE):
    """``(pure_comm [L] seconds on this rank, replayed [L] bool)``; every rank calls it.

    ``forward_s``: the forward's seconds (the same on every rank).  A layer is replayed when
    the replays so far plus its forecast (its rows at the seconds per row measured so far;
    for the first, its exchanges' time in the run, an upper bound) stay within
    ``share * forward_s``; decisions use the slowest rank's numbers, so all ranks agree.
    """
    pure = np.zeros(num_layers)
    replayed = np.zeros(num_layers, dtype=bool)
    mine = np.array([tel.traffic[m].sum() for m in range(len(moe_layers))], np.float64)
    rows = mine.copy()
    exchange_s = np.array([tel.seconds["dispatch"][l] + tel.seconds["combine"][l]
                           for l in moe_layers], np.float64)
    for a in (rows, exchange_s):                    # the slowest rank's
        world.Allreduce(MPI.IN_PLACE, a, op=MPI.MAX)
    budget = np.inf if mode == "all" else share * forward_s
    spent, per_row, done = 0.0, None, []
    for m in spread(len(moe_layers)):
        forecast = exchange_s[m] if per_row is None else per_row * rows[m]
        if spent + forecast > budget:
            break
        seconds = exchanger.replay(tel.exchanges_of(m))
        pure[moe_layers[m]], replayed[moe_layers[m]] = seconds, True
        spent += world.allreduce(seconds, op=MPI.MAX)
        done.append(m)
        per_row = spent / max(rows[done].sum(), 1.0)
    if done:                     # the others: this rank's rows at its replayed seconds per row
        rate = sum(pure[moe_layers[i]] for i in done) / max(mine[done].sum(), 1.0)
        for i, l in enumerate(moe_layers):
            if not replayed[l]:
                pure[l] = rate * mine[i]
    return pure, replayed
