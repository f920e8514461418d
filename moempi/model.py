"""The layer stack one rank holds: norms, dense MLPs and gates of every layer, and its own experts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .hdf5 import ModelReader
from .placement import Placement
from .shapes import ModelMeta


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


def load_weights(path: str, meta: ModelMeta, placement: Placement, ep_rank: int,
                 to_device=lambda a: a, expert_to_device=None, progress=None) -> Weights:
    """Read this rank's share of the model: shared layers whole, experts only where hosted.

    Expert slabs are read one expert at a time (``w_in[e]``, ``w_out[e]``), so a rank never
    touches the bytes of experts it does not host.  ``to_device`` moves each array to the
    compute backend as it is read; ``expert_to_device`` (default: the same) may keep expert
    matrices in BF16 for tensor-core GEMMs.
    """
    expert_to_device = expert_to_device or to_device
    layers = []
    with ModelReader(path) as reader:
        for l in range(meta.num_layers):
            g = f"layers/{l:03d}"
            norm = to_device(reader.read(f"{g}/norm"))
            if meta.is_moe(l):
                layer = MoeLayer(l, norm, to_device(reader.read(f"{g}/gate")))
                for e in placement.experts_on(l, ep_rank):
                    layer.experts[e] = tuple(expert_to_device(w) for w in reader.expert(l, e))
            else:
                layer = DenseLayer(l, norm, to_device(reader.read(f"{g}/mlp/w_in")),
                                   to_device(reader.read(f"{g}/mlp/w_out")))
            layers.append(layer)
            if progress:
                progress(l + 1, meta.num_layers)
        final = to_device(reader.read("final_norm")) if meta.has_final_norm else None
    return Weights(meta, layers, final)
