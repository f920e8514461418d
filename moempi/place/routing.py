"""Expected routing for placement: a run's saved routing trace, or a seeded synthetic model."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from moempi.errors import MoempiError
from moempi.model.shapes import ModelMeta

REGIMES = ("uniform", "zipf", "clusters", "locality")

# Synthetic structure strength: a token is this many times likelier to pick an expert of its
# own group (co-activation cluster, or its node's favoured experts) than one outside it.
GROUP_AFFINITY = 8.0


@dataclass(frozen=True)
class RoutingTrace:
    """Which experts each token used, per MoE layer, and where each token lives.

    ``home_rank`` `[N]` int32: the rank owning the token (data-parallel shard).
    ``topk_idx`` `[num_moe_layers, N, K]` int32: experts used, -1 where the pair was dropped.
    ``moe_layers``: the global layer index of each entry of ``topk_idx``.
    """

    home_rank: np.ndarray
    topk_idx: np.ndarray
    moe_layers: tuple[int, ...]
    num_ranks: int
    num_experts: int
    source: str = "synthetic"

    @property
    def num_tokens(self) -> int:
        return int(self.home_rank.shape[0])

    def counts(self, pos: int) -> np.ndarray:
        """Pairs per (home rank, expert) in MoE layer number ``pos``: `[P, E]` int64."""
        idx = self.topk_idx[pos]
        live = idx >= 0
        homes = np.broadcast_to(self.home_rank[:, None], idx.shape)[live].astype(np.int64)
        flat = homes * self.num_experts + idx[live]
        return np.bincount(flat, minlength=self.num_ranks * self.num_experts).reshape(
            self.num_ranks, self.num_experts)

    def check_model(self, meta: ModelMeta, source: str = "trace") -> "RoutingTrace":
        """Refuse a trace recorded for a different model shape."""
        if self.num_experts != meta.num_experts or tuple(meta.moe_layers) != self.moe_layers \
                or self.topk_idx.shape[2] != meta.top_k:
            raise MoempiError(
                f"{source}: routing is for a model with {self.num_experts} experts, top-{self.topk_idx.shape[2]},"
                f" MoE layers {_span(self.moe_layers)}, but the model has {meta.num_experts} experts, "
                f"top-{meta.top_k}, MoE layers {_span(meta.moe_layers)}")
        return self


def _span(layers) -> str:
    layers = list(layers)
    return f"{layers[0]}..{layers[-1]}" if layers else "none"


def trace_model_meta(path: str) -> ModelMeta:
    """The ModelMeta a run output file was written for (root attribute ``model_meta``)."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_meta")
    except (FileNotFoundError, OSError) as exc:
        raise MoempiError(f"{path}: cannot open run output: {exc}") from None
    if raw is None:
        raise MoempiError(f"{path}: no 'model_meta' attribute; not a moempi run output")
    try:
        fields = json.loads(raw if isinstance(raw, str) else raw.decode())
        known = set(ModelMeta.__dataclass_fields__)
        return ModelMeta(**{k: v for k, v in fields.items() if k in known}).validate(path)
    except (ValueError, TypeError) as exc:
        raise MoempiError(f"{path}: attribute 'model_meta' is not valid ModelMeta JSON: {exc}") from None


def load_trace(path: str, meta: ModelMeta | None = None) -> RoutingTrace:
    """Read the routing saved by ``moempi run --save-routing`` (docs/design.md §2.3).

    Pairs whose ``dest_rank`` is -1 (dropped by capacity) are marked -1 in ``topk_idx``:
    they were never sent, so they load no link.  With ``meta``, a trace written for another
    model is refused.
    """
    import h5py
    file_meta = trace_model_meta(path)
    if meta is not None:
        for name in ("num_experts", "top_k", "num_layers", "num_dense_layers", "hidden_size",
                     "moe_ffn_size"):
            if getattr(file_meta, name) != getattr(meta, name):
                raise MoempiError(f"{path}: trace is from another model ({name} = "
                                  f"{getattr(file_meta, name)} in the trace, {getattr(meta, name)} in the model)")
    with h5py.File(path, "r") as f:
        if "world_size" not in f.attrs:
            raise MoempiError(f"{path}: no 'world_size' attribute; not a moempi run output")
        num_ranks = int(f.attrs["world_size"])
        if "routing/home_rank" not in f:
            raise MoempiError(f"{path}: no /routing/home_rank; rerun with --save-routing")
        home_rank = np.asarray(f["routing/home_rank"][...], dtype=np.int32)
        layers = []
        for l in file_meta.moe_layers:
            name = f"routing/{l:03d}"
            if f"{name}/topk_idx" not in f or f"{name}/dest_rank" not in f:
                raise MoempiError(f"{path}: missing /{name}/topk_idx or dest_rank")
            idx = np.asarray(f[f"{name}/topk_idx"][...], dtype=np.int32)
            dest = np.asarray(f[f"{name}/dest_rank"][...], dtype=np.int32)
            if idx.shape != (home_rank.shape[0], file_meta.top_k) or dest.shape != idx.shape:
                raise MoempiError(f"{path}: /{name} has shape {idx.shape}, expected "
                                  f"({home_rank.shape[0]}, {file_meta.top_k})")
            layers.append(np.where(dest >= 0, idx, -1).astype(np.int32))
    if home_rank.size and (home_rank.min() < 0 or home_rank.max() >= num_ranks):
        raise MoempiError(f"{path}: /routing/home_rank holds ranks outside 0..{num_ranks - 1}")
    topk_idx = np.stack(layers) if layers else np.zeros((0, home_rank.size, file_meta.top_k), np.int32)
    if topk_idx.size and topk_idx.max() >= file_meta.num_experts:
        raise MoempiError(f"{path}: topk_idx holds experts >= num_experts ({file_meta.num_experts})")
    return RoutingTrace(home_rank, topk_idx, tuple(file_meta.moe_layers), num_ranks,
                        file_meta.num_experts, source=path)


def _sample_distinct(rng, weights: np.ndarray, token_group: np.ndarray, top_k: int,
                     allowed: np.ndarray | None = None, block: int = 1) -> np.ndarray:
    """K distinct experts per token, drawn one after another in proportion to ``weights``.

    ``weights`` `[G, E]` (one row per token group), ``token_group`` `[N]` int.  Sequential
    draws without replacement give the same law as Gumbel top-k, in O(N K log E) instead
    of O(N E): inverse-CDF lookups on the groups' CDFs laid end to end, redrawing repeats.
    ``allowed`` `[N, A]` int (optional): each token may only take experts ``e`` with
    ``e // block`` among its row (DeepSeek-V3's expert groups of ``block`` consecutive
    ids); a draw elsewhere is redrawn, which conditions the law on those blocks.
    Returns `[N, K]` int64.
    """
    num_groups, num_experts = weights.shape
    cdf = np.cumsum(weights / weights.sum(1, keepdims=True), axis=1)
    cdf[:, -1] = 1.0
    flat = (cdf + np.arange(num_groups)[:, None]).reshape(-1)      # group g's CDF on [g, g + 1)
    offset = token_group.astype(np.int64) * num_experts

    def draw(rows):
        pos = np.searchsorted(flat, token_group[rows] + rng.random(rows.size), side="right")
        return np.minimum(pos - offset[rows], num_experts - 1)

    picks = np.empty((token_group.size, top_k), dtype=np.int64)
    for k in range(top_k):
        rows = np.arange(token_group.size)
        while rows.size:
            picks[rows, k] = draw(rows)
            redo = (picks[rows, :k] == picks[rows, k:k + 1]).any(1)       # repeats: redraw
            if allowed is not None:                                       # outside: redraw
                redo |= ~(allowed[rows] == picks[rows, k:k + 1] // block).any(1)
            rows = rows[redo]
    return picks


def _grouped_topk(rng, weights: np.ndarray, token_group: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """Top-K experts per token under DeepSeek-V3's group-limited routing: ``topk_group`` of
    the ``n_group`` groups of ``E / n_group`` consecutive experts, drawn in proportion to
    their experts' total weight, then K distinct experts inside them (:func:`_sample_distinct`
    with ``weights`` `[G, E]`).  A stand-in for the router's group score (the sum of a group's
    two best scores): it keeps what placement sees, every token within ``topk_group``
    groups.  Returns `[N, K]` int64."""
    size = meta.num_experts // meta.n_group
    group_weights = weights.reshape(weights.shape[0], meta.n_group, size).sum(-1)   # [G, n_group]
    chosen = _sample_distinct(rng, group_weights, token_group, meta.topk_group)     # [N, topk_group]
    return _sample_distinct(rng, weights, token_group, meta.top_k, chosen, size)


def synthetic_routing(regime: str, num_ranks: int, meta: ModelMeta, tokens_per_rank: int = 256,
                      seed: int = 0, skew: float = 1.0, gpus_per_node: int = 8) -> RoutingTrace:
    """Seeded synthetic routing for planning before any run.

    Tokens are sharded contiguously (``home_rank = token // tokens_per_rank``), as the runner
    does.  Regimes, each with a fresh expert permutation per layer:

    - ``uniform``: every expert equally likely.
    - ``zipf``: popularity of the i-th expert proportional to ``1 / (i + 1) ** skew``.
    - ``clusters``: experts form clusters of 8 (or E/4 when E < 32) that co-activate; each
      half-shard of a rank (a "document") prefers one cluster ``GROUP_AFFINITY`` times.
    - ``locality``: each node's tokens prefer that node's share of the experts (E / nodes).

    Each token takes ``meta.top_k`` distinct experts.  With ``n_group > 1`` (DeepSeek-V3:
    4 of 8 groups) they lie in ``topk_group`` groups of consecutive expert ids
    (:func:`_grouped_topk`); the regime's weights choose the groups and the experts in them.
    """
    if regime not in REGIMES:
        raise MoempiError(f"synthetic routing: regime must be one of {', '.join(REGIMES)}, not {regime!r}")
    if tokens_per_rank < 1:
        raise MoempiError("synthetic routing: tokens_per_rank must be >= 1")
    rng = np.random.default_rng(seed)
    num_experts, top_k = meta.num_experts, meta.top_k
    num_tokens = num_ranks * tokens_per_rank
    home_rank = (np.arange(num_tokens) // tokens_per_rank).astype(np.int32)
    num_nodes = max(1, num_ranks // max(1, gpus_per_node))
    cluster_size = 8 if num_experts >= 32 else max(1, num_experts // 4)
    doc_len = max(1, tokens_per_rank // 2)
    layers = []
    for _ in meta.moe_layers:
        perm = rng.permutation(num_experts)             # expert ids differ per layer
        logits = np.zeros((1, num_experts))
        if regime == "zipf":
            logits[0, perm] = -skew * np.log(np.arange(1, num_experts + 1))
        group_of_expert = np.empty(num_experts, dtype=np.int64)
        if regime == "clusters":
            group_of_expert[perm] = np.arange(num_experts) // cluster_size
            num_groups = -(-num_experts // cluster_size)
            token_group = rng.integers(0, num_groups, size=-(-num_tokens // doc_len))
            token_group = np.repeat(token_group, doc_len)[:num_tokens]
        elif regime == "locality":
            group_of_expert[perm] = np.arange(num_experts) * num_nodes // num_experts
            token_group = home_rank // max(1, gpus_per_node)
        if regime in ("clusters", "locality"):
            num_groups = int(token_group.max()) + 1
            logits = np.where(group_of_expert[None, :] == np.arange(num_groups)[:, None],
                              np.log(GROUP_AFFINITY), 0.0)           # [G, E]
        else:
            token_group = np.zeros(num_tokens, dtype=np.int64)
        weights = np.exp(logits - logits.max())
        if meta.n_group > 1:
            topk = _grouped_topk(rng, weights, token_group, meta)
        else:                                    # the same draws as before groups existed
            topk = _sample_distinct(rng, weights, token_group, top_k)
        layers.append(np.sort(topk, axis=1).astype(np.int32))
    return RoutingTrace(home_rank, np.stack(layers), tuple(meta.moe_layers), num_ranks,
                        num_experts, source=f"synthetic {regime} seed={seed} "
                                            f"tokens_per_rank={tokens_per_rank} skew={skew}")
