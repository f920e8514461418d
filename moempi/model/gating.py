"""Routers: logits -> scores -> top-k experts and their weights (docs/design.md §1).

Two routers, by the model's ``router`` attribute, with transformers' config names:

- ``softmax`` (Mixtral, Qwen2-MoE, Qwen3-MoE, moempi's own models): ``p = softmax(h @ gate)``,
  the ``top_k`` largest ``p + bias``, weights ``p`` (renormalised if ``norm_topk_prob``);
- ``sigmoid`` (DeepSeek-V3, ``topk_method = "noaux_tc"``): ``s = sigmoid(h @ gate)``, the
  experts chosen by ``s + bias`` inside the best ``topk_group`` of ``n_group`` groups,
  weights ``s`` (renormalised if ``norm_topk_prob``) times ``routed_scaling_factor``.

``bias`` only chooses; it is the checkpoint's ``e_score_correction_bias`` plus the load
balancer's ``b`` (both `[E]` float32).  Every tie goes to the lower id (expert or group):
selection is a stable sort of the negated scores.
"""

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


def gate_sigmoid(h: np.ndarray, gate: np.ndarray) -> np.ndarray:
    """``sigmoid(h @ gate)``: h `[N, H]` float32, gate `[H, E]` -> scores `[N, E]` float32."""
    xp = array_module(h)
    logits = h @ gate
    # 1 / (1 + exp(-z)): exp overflows to inf for z < -88, which still gives the right 0
    with np.errstate(over="ignore"):
        xp.negative(logits, out=logits)
        xp.exp(logits, out=logits)
    logits += 1.0
    xp.reciprocal(logits, out=logits)
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


def group_mask(choice: np.ndarray, n_group: int, topk_group: int) -> np.ndarray:
    """The experts of each token's best ``topk_group`` groups: `[N, E]` bool.

    choice `[N, E]` float32, the biased scores; experts ``g*E/n_group .. (g+1)*E/n_group - 1``
    form group ``g``, and a group's score is the sum of its two best biased scores (its one
    score when a group holds a single expert).  Ties go to the lower group id.
    """
    xp = array_module(choice)
    N, E = choice.shape
    grouped = choice.reshape(N, n_group, E // n_group)
    best = -xp.sort(-grouped, axis=2)[:, :, :2]                  # [N, n_group, <=2]
    group_scores = best.sum(axis=2)                              # [N, n_group]
    keep = xp.argsort(-group_scores, axis=1, kind="stable")[:, :topk_group]
    mask = xp.zeros((N, n_group), dtype=bool)
    xp.put_along_axis(mask, keep, True, axis=1)
    return xp.repeat(mask, E // n_group, axis=1)


def route_grouped(scores: np.ndarray, top_k: int, n_group: int, topk_group: int,
                  bias: np.ndarray | None = None, norm_topk_prob: bool = True,
                  routed_scaling_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V3's selection: top-k of ``scores + bias`` among the best groups' experts.

    scores `[N, E]` float32 (sigmoid scores), bias `[E]` float32 or None.  Experts outside
    the chosen groups are excluded (-inf, as DeepSeek's reference code; never chosen while
    ``top_k <= topk_group * E / n_group``, which :class:`ModelMeta` checks).  Weights are the
    unbiased scores of the chosen experts, divided by their sum if ``norm_topk_prob``, times
    ``routed_scaling_factor``.  Returns ``topk_idx`` `[N, K]` int32 (best first) and
    ``topk_weights`` `[N, K]` float32.
    """
    xp = array_module(scores)
    choice = scores if bias is None else scores + bias
    if n_group > 1:
        choice = xp.where(group_mask(choice, n_group, topk_group), choice, -xp.inf)
    topk_idx = xp.argsort(-choice, axis=1, kind="stable")[:, :top_k].astype(np.int32)
    topk_weights = xp.take_along_axis(scores, topk_idx, axis=1)
    if norm_topk_prob:
        # transformers adds 1e-20 to the sum: sigmoid scores may all be ~0
        topk_weights = topk_weights / (topk_weights.sum(axis=1, keepdims=True) + 1e-20)
    topk_weights = topk_weights * routed_scaling_factor
    return topk_idx, topk_weights.astype(np.float32, copy=False)


def router(h: np.ndarray, gate: np.ndarray, meta, bias: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """The model's router on normed tokens: h `[N, H]` float32, gate `[H, E]` float32,
    ``meta`` a :class:`~moempi.model.shapes.ModelMeta`, bias `[E]` float32 or None (the
    correction bias plus the balancer's).  Returns ``topk_idx`` `[N, K]` int32 and
    ``topk_weights`` `[N, K]` float32."""
    if meta.router == "softmax":
        topk_idx, topk_weights = route(gate_probs(h, gate), meta.top_k, bias, meta.norm_topk_prob)
        if meta.routed_scaling_factor != 1.0:
            topk_weights *= np.float32(meta.routed_scaling_factor)
        return topk_idx, topk_weights
    return route_grouped(gate_sigmoid(h, gate), meta.top_k, meta.n_group, meta.topk_group,
                         bias, meta.norm_topk_prob, meta.routed_scaling_factor)
