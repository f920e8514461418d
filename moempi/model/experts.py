"""The expert MLP, RMSNorm and activations, written against an array module ``xp``."""

from __future__ import annotations

import math

import ml_dtypes

from moempi.model.arrays import array_module as _xp


def rmsnorm(x, weight, eps: float):
    """``x / sqrt(mean(x**2, -1) + eps) * weight``; x `[N, H]` float32, weight `[H]`."""
    xp = _xp(x)
    scale = 1.0 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * scale) * weight


def gelu(x):
    """GELU, tanh form (in place on ``x``)."""
    xp = _xp(x)
    inner = xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x))
    x *= 0.5 * (1.0 + inner)
    return x


def silu(x):
    xp = _xp(x)
    x *= 1.0 / (1.0 + xp.exp(-x))
    return x


def relu(x):
    xp = _xp(x)
    return xp.maximum(x, 0, out=x)


ACTIVATIONS = {"gelu": gelu, "silu": silu, "relu": relu}


def mlp(h, w_in, w_out, activation: str):
    """``act(h @ w_in) @ w_out``: h `[N, H]` float32, w_in `[H, F]`, w_out `[F, H]` -> `[N, H]` float32.

    With BF16 weights (the GPU's production mode) the GEMM inputs are BF16 and the products
    accumulate in float32 (cuBLAS GemmEx through CuPy's matmul on ``ml_dtypes.bfloat16``).
    """
    return _matmul(ACTIVATIONS[activation](_matmul(h, w_in)), w_out)


def mlp_bf16(h, w_in, w_out, activate):
    """The expert MLP on BF16 rows as a GPU runs it: h `[N, H]` BF16 (the wire's bits),
    w_in `[H, F]`, w_out `[F, H]` BF16 -> `[N, H]` BF16, ready for the wire.

    Each GEMM accumulates in float32 and writes BF16 (cuBLAS GemmEx); ``activate`` is the
    fused activation, in place on the `[N, F]` BF16 intermediate: no float32 copies.
    """
    return activate(h @ w_in) @ w_out


def _matmul(a, w):
    if w.dtype == ml_dtypes.bfloat16:
        return (a.astype(ml_dtypes.bfloat16) @ w).astype(_xp(a).float32)
    return a @ w
