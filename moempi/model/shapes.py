"""Model shape metadata (docs/design.md §2.1 root attributes) and the named presets; pure."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moempi.errors import MoempiError

ACTIVATIONS = ("gelu", "silu", "relu")
WEIGHT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}   # storage dtype -> B
WEIGHT_DTYPES = tuple(WEIGHT_BYTES)
MLP_KINDS = ("plain", "gated")     # act(h @ w_in) @ w_out | (act(h @ w_gate) * (h @ w_in)) @ w_out
ROUTERS = ("softmax", "sigmoid")   # Mixtral/Qwen/moempi | DeepSeek-V3 (docs/design.md §1)


# an MLP's matrices by kind, in the order of an expert's weight tuple (model/stack.py)
MLP_MATRICES = {"plain": ("w_in", "w_out"), "gated": ("w_in", "w_out", "w_gate")}


def mlp_matrices(kind: str) -> int:
    """Matrices of an MLP of ``kind`` (MLP_KINDS): plain 2 (w_in, w_out), gated 3 (+ w_gate)."""
    return len(MLP_MATRICES[kind])


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
    # the real families (docs/design.md §1); the defaults are moempi's own models
    expert_kind: str = "plain"       # routed experts: plain (two matrices) or gated (three)
    dense_kind: str = "plain"        # the dense layers' MLP
    router: str = "softmax"          # softmax top-k, or DeepSeek-V3's sigmoid with groups
    n_group: int = 1                 # expert groups (E % n_group == 0); > 1 only with sigmoid
    topk_group: int = 1              # groups a token may choose from
    routed_scaling_factor: float = 1.0   # times the routed experts' weights
    shared_ffn_size: int = 0         # hidden of the shared expert MLP (0: none), expert_kind
    shared_expert_gate: bool = False     # Qwen2-MoE: shared output * sigmoid(h @ shared_gate)
    has_score_bias: bool = False     # MoE layers hold e_score_correction_bias [E]

    @property
    def features(self) -> list[str]:
        """What this model uses beyond moempi's original stack (plain experts, softmax
        top-k, no shared expert, no stored bias), as `init-model` reports them."""
        found = []
        if self.expert_kind != "plain" and self.num_layers > self.num_dense_layers:
            found.append("gated experts")
        if self.dense_kind != "plain" and self.num_dense_layers:
            found.append("gated dense MLPs")
        if self.router != "softmax":
            found.append(f"the {self.router} router")
        if self.routed_scaling_factor != 1.0:
            found.append("routed_scaling_factor")
        if self.shared_ffn_size:
            found.append("a shared expert")
        if self.has_score_bias:
            found.append("e_score_correction_bias")
        return found

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
        """Bytes of one expert's matrices (two plain, three gated; DeepSeek-V3: 88.08 MB
        in BF16)."""
        matrices = 3 if self.expert_kind == "gated" else 2
        return matrices * self.hidden_size * self.moe_ffn_size * self.weight_bytes

    @property
    def expert_matrices(self) -> int:
        """Matrices of one routed (or the shared) expert: 2 plain, 3 gated."""
        return mlp_matrices(self.expert_kind)

    @property
    def dense_matrices(self) -> int:
        """Matrices of one dense layer's MLP: 2 plain, 3 gated."""
        return mlp_matrices(self.dense_kind)

    @property
    def replicated_weight_bytes(self) -> int:
        """Bytes of the weights every rank holds whatever the placement, in the stored dtype:
        the dense MLPs, the gates ``[H, E]`` (and ``shared_gate`` ``[H, 1]``), the shared
        experts, the norms, and the float32 ``e_score_correction_bias`` ``[E]``
        (DeepSeek-V3 full: 7.70 GB).  ``perf.memory.memory_per_gpu`` splits the same sum
        by component."""
        H, n_moe, wb = self.hidden_size, len(self.moe_layers), self.weight_bytes
        dense = self.num_dense_layers * self.dense_matrices * H * self.dense_ffn_size
        gates = n_moe * H * (self.num_experts + int(self.shared_expert_gate))
        shared = n_moe * self.expert_matrices * H * self.shared_ffn_size
        norms = (self.num_layers + int(self.has_final_norm)) * H
        bias = n_moe * self.num_experts * 4 if self.has_score_bias else 0
        return (dense + gates + shared + norms) * wb + bias

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
        self._validate_families(source)
        return self

    def _validate_families(self, source: str) -> None:
        for name, value, allowed in (("expert_kind", self.expert_kind, MLP_KINDS),
                                     ("dense_kind", self.dense_kind, MLP_KINDS),
                                     ("router", self.router, ROUTERS)):
            if value not in allowed:
                raise MoempiError(f"{source}: {name} must be one of {', '.join(allowed)}, "
                                  f"not {value!r}")
        E, G = self.num_experts, self.n_group
        if G < 1 or E % G:
            raise MoempiError(f"{source}: n_group ({G}) must be >= 1 and divide num_experts ({E})")
        if G > 1 and self.router != "sigmoid":
            raise MoempiError(f"{source}: n_group > 1 needs router = \"sigmoid\"")
        if not 1 <= self.topk_group <= G:
            raise MoempiError(f"{source}: topk_group ({self.topk_group}) must be in 1..n_group ({G})")
        if self.top_k > self.topk_group * (E // G):
            raise MoempiError(f"{source}: top_k ({self.top_k}) exceeds the experts of "
                              f"topk_group ({self.topk_group}) groups of {E // G}")
        if not self.routed_scaling_factor > 0:
            raise MoempiError(f"{source}: routed_scaling_factor must be > 0")
        if self.shared_ffn_size < 0:
            raise MoempiError(f"{source}: shared_ffn_size must be >= 0")
        if self.shared_expert_gate and not self.shared_ffn_size:
            raise MoempiError(f"{source}: shared_expert_gate without a shared expert")

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
    # DeepSeek-V3's MoE stack as published: gated (SwiGLU) experts and dense layers, top-8
    # sigmoid routing in 4 of 8 groups scaled by 2.5, one shared expert, correction bias
    "deepseek-v3-full": ModelMeta(top_k=8, expert_kind="gated", dense_kind="gated",
                                  router="sigmoid", n_group=8, topk_group=4,
                                  routed_scaling_factor=2.5, shared_ffn_size=2048,
                                  has_score_bias=True),
}
