"""The layer stack one rank holds: norms, dense MLPs and gates of every layer, and its own experts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moempi.model.shapes import ModelMeta


@dataclass
class DenseLayer:
    index: int
    norm: np.ndarray             # [H] float32
    w_in: np.ndarray             # [H, Fd] float32 (gated: the "up" matrix)
    w_out: np.ndarray            # [Fd, H] float32
    w_gate: np.ndarray | None = None   # [H, Fd] float32, gated MLPs only


@dataclass
class MoeLayer:
    index: int
    norm: np.ndarray             # [H] float32
    gate: np.ndarray             # [H, E] float32
    # expert id -> (w_in [H, F], w_out [F, H]), gated experts (w_in, w_out, w_gate [H, F])
    experts: dict = field(default_factory=dict)
    shared: tuple | None = None  # the shared expert, as an expert's tuple (F = Fs), or None
    shared_gate: np.ndarray | None = None   # [H, 1] float32: Qwen2-MoE's sigmoid gate
    score_bias: np.ndarray | None = None    # [E] float32 host: DeepSeek-V3's correction
                                            # bias, the balancer's starting bias


@dataclass
class Weights:
    meta: ModelMeta
    layers: list                 # DenseLayer | MoeLayer, by layer index
    final_norm: np.ndarray | None

    @property
    def nbytes(self) -> int:
        arrays = [self.final_norm] if self.final_norm is not None else []
        for layer in self.layers:
            if isinstance(layer, DenseLayer):
                arrays += [layer.norm, layer.w_in, layer.w_out]
                arrays += [layer.w_gate] if layer.w_gate is not None else []
            else:
                arrays += [layer.norm, layer.gate, *(w for ws in layer.experts.values() for w in ws)]
                arrays += list(layer.shared or ())
                arrays += [layer.shared_gate] if layer.shared_gate is not None else []
        return sum(a.nbytes for a in arrays)
