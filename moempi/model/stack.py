"""The layer stack one rank holds: norms, dense MLPs and gates of every layer, and its own experts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moempi.model.shapes import ModelMeta


@dataclass
class DenseLayer:
    index: int
    norm: np.ndarray             # [H] float32
    w_in: np.ndarray             # [H, Fd] float32
    w_out: np.ndarray            # [Fd, H] float32


@dataclass
class MoeLayer:
    index: int
    norm: np.ndarray             # [H] float32
    gate: np.ndarray             # [H, E] float32
    experts: dict = field(default_factory=dict)   # expert id -> (w_in [H, F], w_out [F, H])


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
            else:
                arrays += [layer.norm, layer.gate, *(w for pair in layer.experts.values() for w in pair)]
        return sum(a.nbytes for a in arrays)
