"""The whole stack on one process, numpy only: what moempi computes (docs/design.md §1).

The runtime splits this work over ranks; this serial form is the definition the converted
checkpoints are checked with (tests/test_families.py) beside the float64 reference.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from moempi.model.experts import ffn, rmsnorm
from moempi.model.gating import router
from moempi.model.shapes import ModelMeta


def moe_block(h: np.ndarray, layer: Mapping, meta: ModelMeta,
              bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One MoE layer's update on normed tokens (no residual).

    h `[N, H]` float32.  ``layer``: ``gate`` `[H, E]`; ``experts``, a mapping of ``w_in``,
    ``w_out`` (and ``w_gate`` when gated), each indexable by expert id (``[e]`` -> `[H, F]`
    or `[F, H]` float32: an array `[E, H, F]` or a lazy reader); with a shared expert,
    ``shared`` (the same names, `[H, Fs]`, `[Fs, H]`) and, if gated, ``shared_gate`` `[H, 1]`;
    with ``has_score_bias``, ``e_score_correction_bias`` `[E]`.  ``bias`` `[E]`: the
    balancer's, added to the correction bias for the selection only.
    Returns the update `[N, H]` float32 and ``topk_idx`` `[N, K]` int32.
    """
    selection = layer.get("e_score_correction_bias") if meta.has_score_bias else None
    if bias is not None:
        selection = bias if selection is None else selection + bias
    topk_idx, topk_weights = router(h, layer["gate"], meta, selection)
    update = np.zeros_like(h)
    experts = layer["experts"]
    for e in np.unique(topk_idx):
        rows, slot = np.nonzero(topk_idx == e)
        w = {name: experts[name][e] for name in experts}
        update[rows] += topk_weights[rows, slot, None] * ffn(h[rows], w, meta.expert_kind,
                                                            meta.activation)
    if meta.shared_ffn_size:
        shared = ffn(h, layer["shared"], meta.expert_kind, meta.activation)
        if meta.shared_expert_gate:
            shared *= 1.0 / (1.0 + np.exp(-(h @ layer["shared_gate"])))      # [N, 1]
        update += shared
    return update, topk_idx


def forward(x: np.ndarray, meta: ModelMeta, layers: Iterable[Mapping],
            final_norm: np.ndarray | None, biases: Mapping | None = None,
            routing: dict | None = None) -> np.ndarray:
    """``y`` `[N, H]` float32 from tokens ``x`` `[N, H]`: every layer
    ``x = x + ffn_l(rmsnorm(x, norm_l))``, then the final norm if there is one.

    ``layers`` yields each layer's arrays in order (``norm`` `[H]`; a dense layer's ``mlp``
    mapping ``w_in`` `[H, Fd]`, ``w_out`` `[Fd, H]`, ``w_gate`` when gated; a MoE layer's as
    :func:`moe_block`), so a reader may load one layer at a time.  ``biases``: optional
    ``{layer: [E]}`` balancer bias.  ``routing``: a dict that receives ``{layer: topk_idx}``.
    """
    x = np.array(x, dtype=np.float32)
    for l, layer in enumerate(layers):
        h = rmsnorm(x, layer["norm"], meta.norm_eps)
        if meta.is_moe(l):
            update, topk_idx = moe_block(h, layer, meta, None if biases is None else biases.get(l))
            if routing is not None:
                routing[l] = topk_idx
        else:
            update = ffn(h, layer["mlp"], meta.dense_kind, meta.activation)
        x += update
    return x if final_norm is None else rmsnorm(x, final_norm, meta.norm_eps)
