"""Model shape metadata (docs/design.md §2.1 root attributes) and the named presets; pure."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moempi.errors import MoempiError

ACTIVATIONS = ("gelu", "silu", "relu")
WEIGHT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}   # storage dtype -> B
WEIGHT_DTYPES = tuple(WEIGHT_BYTES)


@dataclass(frozen=True)
class ModelMeta:
    """The shape of a MoE stack: everything but the weights."""

    hidden_size: int = 7168          # H
    moe_ffn_size: int = 2048         # F, expert MLP hidden
    dense_ffn_size: int = 18432      # Fd, dense MLP hidden
    num_layers: int = 61             # L
    num_dense_layers: int = 3        # D, the first D layers are dense
    num_experts: int = 256           # E per MoE layer
    top_k: int = 2                   # K experts per token
    activation: str = "silu"
    norm_eps: float = 1e-6
    norm_topk_prob: bool = True      # renormalise the top-k weights to sum to 1
    weight_dtype: str = "bfloat16"   # storage dtype of the matrices
    has_final_norm: bool = True

    @property
    def moe_layers(self) -> range:
        return range(self.num_dense_layers, self.num_layers)

    def is_moe(self, layer: int) -> bool:
        return layer >= self.num_dense_layers

    @property
    def weight_bytes(self) -> int:
        return WEIGHT_BYTES[self.weight_dtype]

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's two matrices (DeepSeek-V3: 58.72 MB in BF16)."""
        return 2 * self.hidden_size * self.moe_ffn_size * self.weight_bytes

    def validate(self, source: str = "model") -> "ModelMeta":
        for name in ("hidden_size", "moe_ffn_size", "num_layers", "num_experts", "top_k"):
            if getattr(self, name) < 1:
                raise MoempiError(f"{source}: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.num_dense_layers <= self.num_layers:
            raise MoempiError(f"{source}: num_dense_layers ({self.num_dense_layers}) must be in "
                              f"0..num_layers ({self.num_layers})")
        if self.num_dense_layers and self.dense_ffn_size < 1:
            raise MoempiError(f"{source}: dense_ffn_size must be >= 1 with dense layers")
        if self.top_k > self.num_experts:
            raise MoempiError(f"{source}: top_k ({self.top_k}) exceeds num_experts "
                              f"({self.num_experts})")
        if self.activation not in ACTIVATIONS:
            raise MoempiError(f"{source}: activation must be one of {', '.join(ACTIVATIONS)}, "
                              f"not {self.activation!r}")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise MoempiError(f"{source}: weight dtype must be one of {', '.join(WEIGHT_DTYPES)}")
        if not self.norm_eps > 0:
            raise MoempiError(f"{source}: norm_eps must be > 0")
        return self

    def replace(self, **changes) -> "ModelMeta":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelMeta] = {
    # a few layers, for unit tests
    "tiny": ModelMeta(hidden_size=64, moe_ffn_size=32, dense_ffn_size=96, num_layers=6,
                      num_dense_layers=1, num_experts=4, weight_dtype="bfloat16"),
    # the demo: the full 61-layer depth, 4 experts, small hidden
    "small": ModelMeta(hidden_size=256, moe_ffn_size=128, dense_ffn_size=384, num_layers=61,
                       num_dense_layers=3, num_experts=4),
    # DeepSeek-V3's MoE stack: 61 layers, 3 dense, hidden 7168, expert hidden 2048, BF16
    "deepseek-v3": ModelMeta(),
}
