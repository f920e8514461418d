"""Memory per GPU of a moempi layout (weights, activations, exchange buffers) and the TP that fits."""

from __future__ import annotations

import math

from moempi.errors import MoempiError
from moempi.model.shapes import ModelMeta

ACC_BYTES = 4           # float32: resident hidden state, gate probabilities, expert accumulators
TP_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)   # expert tensor-parallel widths tried by the fit search


def experts_per_gpu(num_experts: int, ep: int) -> int:
    """Experts of one MoE layer held by one expert-parallel slot: ceil(E / ep) (docs/design.md §2.4).

    ep >= E: one expert per slot, spare slots hold replicas; ep < E: packing, ceil(E / ep).
    """
    return math.ceil(num_experts / ep)


def memory_per_gpu(meta: ModelMeta, ep: int, tp: int, tokens_per_gpu: int, micro_batches: int,
                   wire_bytes: int = 2, weight_bytes: int | None = None,
                   skew: float = 1.0) -> dict[str, int]:
    """Bytes held by one GPU, by component; ``total`` is their sum.

    Layout: ``ep`` expert-parallel slots of ``tp`` GPUs each; one slot's experts are split
    ``tp`` ways by Megatron-style expert tensor parallelism (``Win`` by columns, ``Wout`` by
    rows), so expert bytes shrink by ``tp``; dense layers, gates, norms and the shared
    expert are replicated on every GPU (each GPU runs them for its own tokens,
    docs/design.md §3).  ``weight_bytes`` is the in-memory weight dtype (default the
    model's: 2 for BF16; the exact mode may hold fp32, 4).  ``skew`` is the max/mean expert
    load (1 for uniform routing): it scales receive buffers.

    Components (T tokens per GPU, K top-k, H hidden, F expert hidden, Fd dense hidden, Fs
    shared expert hidden (0: none), E experts, m micro-batches; Me, Md the matrices of an
    expert and of a dense MLP: 2 plain, 3 gated):
      experts      = (L-D) * ceil(E/ep) * Me*H*F * wb / tp      seed: 2*7168*2048*2 B = 58.72 MB
                     per expert (gated: 88.08 MB); ceil(E/ep) packed experts per slot when
                     E > ep, one (a replica on spare slots) when ep >= E
      dense        = D * Md*H*Fd * wb                            the dense MLPs
      shared       = (L-D) * Me*H*Fs * wb                        the shared expert, whole on every GPU
      gate         = (L-D) * (H*E [+ H, shared_gate] * wb [+ E*4, e_score_correction_bias fp32])
      norms        = (L+1) * H * wb                              per-layer RMSNorm + final norm
      activations  = T * (2*H + E [+ H with a shared expert]) * 4
                     x and h [T, H] f32, probs [T, E] f32, the shared expert's output [T, H]
                     f32 (kept until its micro-batch's combine adds it)
      exchange     = 4 * tp * T*K*H * wire * skew
                     dispatch send/recv + combine send/recv for all m micro-batches in flight
                     (each micro-batch moves on independently, docs/design.md §3); with tp > 1
                     each pair goes to the tp ranks of its expert's slot and a partial row of
                     each comes back (docs/design.md §3), so tp times the rows
      workspace    = ceil(T/m) * (K * skew * ((Me-1)*F + tp*H) + (Me-1)*Fs) * 4
                     one micro-batch's expert intermediate [n, F/tp] per TP shard of tp*n
                     rows (gated: act(h @ Wg) and h @ Win, two of them) and its f32 output,
                     and the shared expert's intermediate for the same micro-batch
    """
    if min(ep, tp, tokens_per_gpu, micro_batches) < 1:
        raise MoempiError(f"memory model: ep ({ep}), tp ({tp}), tokens per GPU ({tokens_per_gpu}) "
                          f"and micro-batches ({micro_batches}) must be >= 1")
    wb = meta.weight_bytes if weight_bytes is None else weight_bytes
    H, F, Fd, Fs, E, K = (meta.hidden_size, meta.moe_ffn_size, meta.dense_ffn_size,
                          meta.shared_ffn_size, meta.num_experts, meta.top_k)
    Me, Md = meta.expert_matrices, meta.dense_matrices
    T, m = tokens_per_gpu, micro_batches
    n_moe, n_dense = len(meta.moe_layers), meta.num_dense_layers
    pairs = T * K * skew                               # (token, expert) pairs a GPU sends/receives
    bias = E * ACC_BYTES if meta.has_score_bias else 0
    parts = {
        "experts": math.ceil(n_moe * experts_per_gpu(E, ep) * Me * H * F * wb / tp),
        "dense": n_dense * Md * H * Fd * wb,
        "shared": n_moe * Me * H * Fs * wb,
        "gate": n_moe * (H * (E + int(meta.shared_expert_gate)) * wb + bias),
        "norms": (meta.num_layers + int(meta.has_final_norm)) * H * wb,
        "activations": T * (2 * H + E + (H if Fs else 0)) * ACC_BYTES,
        "exchange": math.ceil(4 * tp * pairs * H * wire_bytes),
        "workspace": math.ceil(math.ceil(T / m) * (K * skew * ((Me - 1) * F + tp * H)
                                                   + (Me - 1) * Fs) * ACC_BYTES),
    }
    parts["total"] = sum(parts.values())
    return parts


WEIGHT_PARTS = ("experts", "dense", "shared", "gate", "norms")   # of memory_per_gpu: weights


def smallest_fitting_tp(meta: ModelMeta, ep: int, tokens_per_gpu: int, micro_batches: int,
                        capacity_bytes: float, wire_bytes: int = 2, weight_bytes: int | None = None,
                        skew: float = 1.0, max_tp: int = 64) -> int | None:
    """Smallest TP width in 1, 2, 4, ... (dividing F, at most ``max_tp``) whose total fits
    ``capacity_bytes``; None when none does (dense layers, gates or activations alone too big)."""
    for tp in TP_CANDIDATES:
        if tp > max_tp or meta.moe_ffn_size % tp:
            break
        used = memory_per_gpu(meta, ep, tp, tokens_per_gpu, micro_batches, wire_bytes,
                              weight_bytes, skew)["total"]
        if used <= capacity_bytes:
            return tp
    return None


def check_fits(meta: ModelMeta, ep: int, tp: int, tokens_per_gpu: int, micro_batches: int,
               capacity_bytes: float, wire_bytes: int = 2, weight_bytes: int | None = None,
               skew: float = 1.0, max_tp: int = 64, source: str = "run") -> dict[str, int]:
    """Return :func:`memory_per_gpu` when it fits ``capacity_bytes``, else raise MoempiError
    naming the need, the capacity and the smallest TP that would fit."""
    parts = memory_per_gpu(meta, ep, tp, tokens_per_gpu, micro_batches, wire_bytes,
                           weight_bytes, skew)
    if parts["total"] <= capacity_bytes:
        return parts
    fit = smallest_fitting_tp(meta, ep, tokens_per_gpu, micro_batches, capacity_bytes,
                              wire_bytes, weight_bytes, skew, max_tp)
    hint = (f"tp={fit} would fit" if fit is not None else
            f"no tp up to {max_tp} fits: use more expert-parallel ranks or fewer tokens per GPU")
    raise MoempiError(f"{source}: ep={ep} tp={tp} with {tokens_per_gpu} tokens per GPU needs "
                      f"{parts['total'] / 1e9:.2f} GB per GPU of {capacity_bytes / 1e9:.2f} GB "
                      f"(experts {parts['experts'] / 1e9:.2f} GB); {hint}")


def available_host_bytes() -> int | None:
    """This node's MemAvailable (Linux ``/proc/meminfo``), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_memory(meta: ModelMeta, ep: int, batch_tokens: int, wire_bytes: int,
                      weights_on_host: bool, available_bytes: float, source: str = "run",
                      tp: int = 1) -> int:
    """Refuse a rank whose host memory cannot hold what it keeps, naming the parts and the
    knob; returns the bytes it needs.

    A rank keeps one batch's working set (:func:`memory_per_gpu` at ``batch_tokens`` tokens:
    activations, exchange buffers, expert workspace), that batch's output rows until rank 0
    has written them (``batch_tokens`` x H float32) and, on a CPU backend, its weights in
    float32 and, with a BF16 wire, the codec's host rows (the received rows widened to
    float32, the tokens rounded before the gather).
    """
    parts = memory_per_gpu(meta, ep, tp, batch_tokens, 1, wire_bytes, weight_bytes=ACC_BYTES)
    weights = sum(parts[k] for k in WEIGHT_PARTS)
    batch = parts["total"] - weights + batch_tokens * meta.hidden_size * ACC_BYTES
    if weights_on_host and wire_bytes == 2:
        batch += batch_tokens * meta.hidden_size * (tp * meta.top_k * ACC_BYTES + wire_bytes)
    need = batch + (weights if weights_on_host else 0)
    if need > available_bytes:
        held = f" and {weights / 1e9:.2f} GB of weights" if weights_on_host else ""
        raise MoempiError(
            f"{source}: a rank needs {need / 1e9:.2f} GB of host memory ({batch / 1e9:.2f} GB "
            f"for a batch of {batch_tokens} tokens{held}) but has "
            f"{available_bytes / 1e9:.2f} GB (run.host_memory_gb): lower "
            "pipeline.batch_tokens or use more ranks")
    return need
