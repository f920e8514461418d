"""One MoE layer of DeepSeek-V3's real shapes (``--preset deepseek-v3-full``), experts packed, against its plain-GEMM floor.

The layer as ``moempi run`` computes it (``pipeline.run_batch``): gated experts of H 7168 /
F 2048, top-8 sigmoid routing in the best 4 of 8 groups with a correction bias and the
routed scaling, and the shared expert computed while the dispatch is in flight.  All 256
experts do not fit this benchmark's machine (in float32, 176 MB each: 45 GB), so the layer
holds ``experts`` of them (16 by default: 2 per group, so top-8 takes every expert of its
4 groups), packed ``experts / ranks`` per rank.  The floor is the slowest rank's GEMM rows
(its routed pairs through three ``[H, F]``-sized matrices, and its own tokens through the
shared expert's) at the plain numpy GEMM rate, every rank timing at once.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from moempi.measure.bench import forward, plain_gemm_flops
from moempi.model.shapes import PRESETS
from moempi.model.stack import MoeLayer, Weights
from moempi.place.placement import Placement


def synthetic_full(comm, tokens: int, experts: int, hidden: int = 0, ffn: int = 0,
                   seed: int = 0):
    """A one-layer stack of the full preset's MoE layer (``hidden``/``ffn`` 0: the real
    7168 / 2048): this rank's packed experts, the shared expert, random tokens."""
    base = PRESETS["deepseek-v3-full"]
    H, F = hidden or base.hidden_size, ffn or base.moe_ffn_size
    meta = base.replace(num_layers=1, num_dense_layers=0, num_experts=experts, hidden_size=H,
                        moe_ffn_size=F, shared_ffn_size=F, weight_dtype="float32",
                        has_final_norm=False).validate("bench full")
    placement = Placement.default(experts, comm.size, meta.moe_layers)
    shared = np.random.default_rng(seed)
    rng = np.random.default_rng([seed, comm.rank])

    def matrices(rng, width):          # (w_in, w_out, w_gate), N(0, 1/fan_in)
        return ((rng.standard_normal((H, width), np.float32) / np.float32(H**0.5)),
                (rng.standard_normal((width, H), np.float32) / np.float32(width**0.5)),
                (rng.standard_normal((H, width), np.float32) / np.float32(H**0.5)))

    layer = MoeLayer(0, np.ones(H, np.float32),
                     (shared.standard_normal((H, experts), np.float32) * np.float32(2 / H**0.5)))
    layer.score_bias = (0.01 * shared.standard_normal(experts)).astype(np.float32)
    layer.shared = matrices(shared, F)
    for e in placement.experts_on(0, comm.rank):
        layer.experts[e] = matrices(rng, F)
    x = rng.standard_normal((tokens, H), np.float32)
    return Weights(meta, [layer], None), placement, x


def bench_full(comm, echo, tokens: int = 256, experts: int = 16, quick: bool = False,
               repeats: int = 3) -> dict:
    """The layer's time (best of ``repeats`` passes, slowest rank) over its floor."""
    hidden, ffn = (256, 64) if quick else (0, 0)
    weights, placement, x = synthetic_full(comm, tokens, experts, hidden, ffn)
    meta, layer = weights.meta, weights.layers[0]
    H, F, Fs = meta.hidden_size, meta.moe_ffn_size, meta.shared_ffn_size
    bias = layer.score_bias[None]                  # the balancer's start: the correction bias
    forward(comm, weights, placement, x, 1, True, replay=False, bias=bias)       # warm-up
    t, tel, _ = min((forward(comm, weights, placement, x, 1, True, replay=False, bias=bias)
                     for _ in range(repeats)), key=lambda run: run[0])
    rows = int(tel.rows_computed.sum())            # this rank's routed pairs
    comm.Barrier()
    rate = plain_gemm_flops(H, F, max(rows, 1), repeats=2)
    shared_rate = plain_gemm_flops(H, Fs, len(x), repeats=2)
    # three matrices per gated MLP: 6 H F flops per row (the plain GEMM pair is 4 H F)
    floor = comm.allreduce(6.0 * rows * H * F / rate + 6.0 * len(x) * H * Fs / shared_rate,
                           op=MPI.MAX)
    sec = {k: float(v.sum()) for k, v in tel.seconds.items()}
    busiest = comm.allreduce((sec["busy"], comm.rank), op=MPI.MAXLOC)[1]
    sec = comm.bcast(sec, root=busiest)
    rows_max = comm.allreduce(rows, op=MPI.MAX)
    result = {"layer_s": t, "floor_s": floor, "ratio": t / floor, "rows": rows_max,
              "experts": experts, "tokens": tokens, "seconds": sec}
    echo(f"full-shape MoE layer (deepseek-v3-full: H {H}, gated experts of F {F}, {experts} of "
         f"its {PRESETS['deepseek-v3-full'].num_experts} experts packed {experts // comm.size} "
         f"per rank, top-{meta.top_k} in {meta.topk_group} of {meta.n_group} groups, shared "
         f"expert of {Fs}, {tokens} tokens/rank, {comm.size} ranks, fp32): "
         f"{t * 1e3:.1f} ms vs its plain-GEMM floor {floor * 1e3:.1f} ms -> {t / floor:.3f}")
    echo(f"  busiest rank ({rows_max} routed rows + {tokens} shared): expert "
         f"{sec['expert'] * 1e3:.1f} ms (shared expert included), gate {sec['gate'] * 1e3:.1f} "
         f"ms, exchange local work {(sec['compute'] - sec['gate'] - sec['expert']) * 1e3:.1f} "
         f"ms, waiting on exchanges {sec['wait'] * 1e3:.1f} ms")
    return result
