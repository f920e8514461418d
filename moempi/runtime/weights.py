"""Weight loading: each rank reads its share of the model file (shared layers whole, its own experts)."""

from __future__ import annotations

from moempi.io.hdf5 import ModelReader
from moempi.model.shapes import ModelMeta
from moempi.model.stack import DenseLayer, MoeLayer, Weights
from moempi.place.placement import Placement


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
