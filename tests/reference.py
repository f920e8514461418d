"""An independent float64 reference of docs/design.md §1, reading the HDF5 files directly.

It shares no code with moempi on purpose: a bug there cannot hide here.
"""

from __future__ import annotations

import h5py
import numpy as np


def _read(ds, sel=()) -> np.ndarray:
    data = ds[sel]
    if ds.dtype == np.uint16:
        assert ds.attrs["encoding"] in ("bfloat16", b"bfloat16")
        data = (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float64)


def _act(name, z):
    if name == "gelu":
        return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    if name == "silu":
        return z / (1 + np.exp(-z))
    return np.maximum(z, 0)


def _norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _attr(a, name, default):
    return a[name] if name in a else default


def _ffn(g, prefix, act, gated, h, e=()):
    """A plain ``act(h Win) Wout`` or gated ``(act(h Wgate) * h Win) Wout`` MLP."""
    z = _act(act, h @ _read(g[f"{prefix}/w_gate"], e)) * (h @ _read(g[f"{prefix}/w_in"], e)) \
        if gated else _act(act, h @ _read(g[f"{prefix}/w_in"], e))
    return z @ _read(g[f"{prefix}/w_out"], e)


def _choose(score, K, n_group, topk_group):
    """Per token: the K experts of largest score, best first, among the experts of its best
    ``topk_group`` groups (a group's score: the sum of its two largest); every tie to the
    lower id."""
    N, E = score.shape
    size = E // n_group
    idx = []
    for s in score:
        groups = [sum(sorted(s[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: (-groups[g], g))[:topk_group]
        allowed = [e for e in range(E) if e // size in kept]
        idx.append(sorted(allowed, key=lambda e: (-s[e], e))[:K])
    return np.array(idx)


def forward(model_path: str, tokens_path: str, biases=None, routing=None) -> np.ndarray:
    """y `[N, H]` float64.  ``biases``: optional ``{layer: [E]}`` load-balance bias."""
    with h5py.File(tokens_path, "r") as f:
        x = _read(f["tokens"])
    return forward_array(model_path, x, biases, routing)


def forward_array(model_path: str, x, biases=None, routing=None) -> np.ndarray:
    """y `[N, H]` float64 of tokens ``x`` `[N, H]`; ``routing``: a dict that receives each MoE
    layer's chosen experts ``{layer: [N, K]}``."""
    x = np.asarray(x, dtype=np.float64)
    with h5py.File(model_path, "r") as m:
        a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in m.attrs.items()}
        eps, K, act = float(a["norm_eps"]), int(a["top_k"]), a["activation"]
        gated = _attr(a, "expert_kind", "plain") == "gated"
        dense_gated = _attr(a, "dense_kind", "plain") == "gated"
        sigmoid = _attr(a, "router", "softmax") == "sigmoid"
        n_group, topk_group = int(_attr(a, "n_group", 1)), int(_attr(a, "topk_group", 1))
        scaling = float(_attr(a, "routed_scaling_factor", 1.0))
        for l in range(int(a["num_layers"])):
            g = m[f"layers/{l:03d}"]
            h = _norm(x, _read(g["norm"]), eps)
            if l < int(a["num_dense_layers"]):
                x = x + _ffn(g, "mlp", act, dense_gated, h)
                continue
            logits = h @ _read(g["gate"])
            if sigmoid:
                p = 1 / (1 + np.exp(-logits))
            else:
                p = np.exp(logits - logits.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
            score = p.copy()
            if "e_score_correction_bias" in g:
                score += _read(g["e_score_correction_bias"])
            if biases is not None:
                score += np.asarray(biases[l], dtype=np.float64)
            idx = _choose(score, K, n_group, topk_group)
            if routing is not None:
                routing[l] = idx
            w = np.take_along_axis(p, idx, 1)
            if a["norm_topk_prob"]:
                w = w / w.sum(1, keepdims=True)
            w = w * scaling
            update = np.zeros_like(x)
            for e in range(p.shape[1]):
                rows, slot = np.nonzero(idx == e)
                if len(rows):
                    update[rows] += w[rows, slot][:, None] * _ffn(g, "experts", act, gated,
                                                                  h[rows], e)
            if "shared" in g:
                shared = _ffn(g, "shared", act, gated, h)
                if "shared_gate" in g:
                    shared = shared / (1 + np.exp(-(h @ _read(g["shared_gate"]))))
                update += shared
            x = x + update
        if "final_norm" in m:
            x = _norm(x, _read(m["final_norm"]), eps)
    return x


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
