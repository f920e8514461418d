"""Gating: logits -> softmax -> top-k with the load-balance bias -> weights (docs/design.md §1)."""

from __future__ import annotations

import numpy as np

from moempi.model.arrays import array_module


def gate_probs(h: np.ndarray, gate: np.ndarray) -> np.ndarray:
    """``softmax(h @ gate)``: h `[N, H]` float32, gate `[H, E]` -> probs `[N, E]` float32."""
    xp = array_module(h)
    logits = h @ gate
    logits -= logits.max(axis=1, keepdims=True)
    xp.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def route(probs: np.ndarray, top_k: int, bias: np.ndarray | None = None,
          norm_topk_prob: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Choose ``top_k`` experts per token by ``probs + bias``; weights from unbiased ``probs``.

    probs `[N, E]` float32, bias `[E]` float32 or None.  Ties go to the lower expert id
    (a stable sort of the negated scores).  Returns ``topk_idx`` `[N, K]` int32 and
    ``topk_weights`` `[N, K]` float32.
    """
    xp = array_module(probs)
    scores = probs if bias is None else probs + bias
    topk_idx = xp.argsort(-scores, axis=1, kind="stable")[:, :top_k].astype(np.int32)
    topk_weights = xp.take_along_axis(probs, topk_idx, axis=1)
    if norm_topk_prob:
        topk_weights = topk_weights / topk_weights.sum(axis=1, keepdims=True)
    return topk_idx, topk_weights.astype(np.float32, copy=False)
