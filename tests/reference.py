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


def forward(model_path: str, tokens_path: str, biases=None) -> np.ndarray:
    """y `[N, H]` float64.  ``biases``: optional ``{layer: [E]}`` load-balance bias."""
    with h5py.File(tokens_path, "r") as f:
        x = _read(f["tokens"])
    with h5py.File(model_path, "r") as m:
        a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in m.attrs.items()}
        eps, K, act = float(a["norm_eps"]), int(a["top_k"]), a["activation"]
        for l in range(int(a["num_layers"])):
            g = m[f"layers/{l:03d}"]
            h = _norm(x, _read(g["norm"]), eps)
            if l < int(a["num_dense_layers"]):
                x = x + _act(act, h @ _read(g["mlp/w_in"])) @ _read(g["mlp/w_out"])
                continue
            logits = h @ _read(g["gate"])
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            score = p if biases is None else p + np.asarray(biases[l], dtype=np.float64)
            # top-K, largest first; equal scores go to the lower expert id
            idx = np.array([sorted(range(p.shape[1]), key=lambda e: (-s[e], e))[:K]
                            for s in score])
            w = np.take_along_axis(p, idx, 1)
            if a["norm_topk_prob"]:
                w = w / w.sum(1, keepdims=True)
            update = np.zeros_like(x)
            for e in range(p.shape[1]):
                rows, slot = np.nonzero(idx == e)
                if len(rows):
                    y = _act(act, h[rows] @ _read(g["experts/w_in"], e)) \
                        @ _read(g["experts/w_out"], e)
                    update[rows] += w[rows, slot][:, None] * y
            x = x + update
        if "final_norm" in m:
            x = _norm(x, _read(m["final_norm"]), eps)
    return x


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
