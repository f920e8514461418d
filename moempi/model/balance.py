"""Load balancing of the gating: per-batch expert loads, the bias update, expert capacity."""

from __future__ import annotations

import numpy as np


class BiasBalancer:
    """DeepSeek-V3's auxiliary-loss-free balancing: a per-layer, per-expert selection bias.

    After each batch, with every rank holding the same loads (one allreduce),
    ``b <- b + rate * sign(mean_load - load)``, optionally clipped to ``[-clip, clip]``.
    The bias only chooses experts; weights still come from the unbiased softmax.
    """

    def __init__(self, cfg, num_moe: int, num_experts: int):
        """``cfg``: the run configuration's ``[balance]`` section (``enabled``, ``rate``,
        ``clip``; docs/design.md §2.5)."""
        self.cfg = cfg
        self.bias = np.zeros((num_moe, num_experts), dtype=np.float32)   # [L_moe, E]

    def update(self, tokens_per_expert: np.ndarray) -> None:
        """``tokens_per_expert`` `[L_moe, E]`: the batch's load, identical on every rank."""
        if not self.cfg.enabled:
            return
        load = tokens_per_expert.astype(np.float64)
        step = np.sign(load.mean(axis=1, keepdims=True) - load)
        self.bias += np.float32(self.cfg.rate) * step.astype(np.float32)
        if self.cfg.clip > 0:
            np.clip(self.bias, -self.cfg.clip, self.cfg.clip, out=self.bias)


def max_violation(tokens_per_expert: np.ndarray) -> np.ndarray:
    """MaxVio per layer: ``max(load) / mean(load) - 1``; tokens_per_expert `[..., E]`."""
    load = tokens_per_expert.astype(np.float64)
    return load.max(axis=-1) / np.maximum(load.mean(axis=-1), 1e-12) - 1.0


def capacity(num_pairs: int, num_experts: int, replicas: np.ndarray, factor: float) -> np.ndarray:
    """Per-expert room for one home rank's micro-batch: ``factor`` x its mean share per replica.

    ``replicas`` `[E]` replica counts.  Summed over home ranks and micro-batches, each
    replica then takes at most ``factor`` x the batch's mean load per replica, with no
    extra communication.  Returns `[E]` int64.
    """
    per_replica = factor * num_pairs / max(int(replicas.sum()), 1)
    return np.ceil(per_replica * replicas).astype(np.int64)


def apply_capacity(scores: np.ndarray, topk_idx: np.ndarray, room: np.ndarray,
                   reroute: bool) -> tuple[np.ndarray, int, int]:
    """Keep at most ``room[e]`` pairs per expert; overflow rerouted or dropped.

    scores `[N, E]` (probs + bias), topk_idx `[N, K]` int32, room `[E]` int64.  Earlier
    slots and higher scores keep their place; an overflowing pair moves to the token's
    next-best expert that has room and that the token does not already use, or is dropped
    (-1).  Returns (new topk_idx, rerouted, dropped).
    """
    idx = topk_idx.copy()
    room = room.copy()
    overflow = []
    for k in range(idx.shape[1]):
        col = idx[:, k]
        order = np.lexsort((-scores[np.arange(len(col)), col], col))   # by expert, best first
        experts = col[order]
        starts = np.searchsorted(experts, experts, side="left")
        rank = np.arange(len(order)) - starts                          # place in its expert's queue
        keep = rank < room[experts]
        np.subtract.at(room, experts[keep], 1)
        overflow += [(int(t), k) for t in order[~keep]]
    rerouted = dropped = 0
    for token, k in overflow:
        new = -1
        if reroute:
            used = set(idx[token].tolist())
            for e in np.argsort(-scores[token], kind="stable"):
                if room[e] > 0 and e not in used:
                    new = int(e)
                    room[e] -= 1
                    break
        idx[token, k] = new
        rerouted += new >= 0
        dropped += new < 0
    return idx, rerouted, dropped


def topk_weights_for(probs: np.ndarray, topk_idx: np.ndarray, chosen: np.ndarray,
                     norm_topk_prob: bool) -> np.ndarray:
    """Weights of the selection after capacity, from the unbiased probs.

    ``chosen`` `[N, K]` is the selection before capacity.  A rerouted pair weighs its new
    expert's probability; a dropped pair weighs 0 and the token's other weights stay what
    they were (normalised over the slots it had, dropped ones included): dropping a pair
    removes its contribution, it does not hand it to the others.
    """
    kept = np.take_along_axis(probs, np.maximum(topk_idx, 0), axis=1)
    before = np.take_along_axis(probs, chosen, axis=1)
    w = np.where(topk_idx >= 0, kept, 0)
    if norm_topk_prob:
        w = w / np.maximum(np.where(topk_idx >= 0, kept, before).sum(axis=1, keepdims=True),
                           1e-30)
    return w.astype(np.float32)
