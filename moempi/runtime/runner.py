"""The `moempi run` job: set-up on rank 0, the batched forward pass, the output file."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from mpi4py import MPI

from moempi import __version__
from moempi.io import files, hdf5
from moempi.model.balance import BiasBalancer, max_violation
from moempi.runtime import parallel
from moempi.runtime.backend import make_backend
from moempi.runtime.checkpoint import (Checkpoint, check_checkpoint_path, checkpoint_complete, fingerprint, scan)
from moempi.errors import MoempiError
from moempi.io.config import Config
from moempi.model.experts import mlp, rmsnorm
from moempi.model.shapes import ModelMeta
from moempi.perf.memory import available_host_bytes, check_host_memory
from moempi.place.placement import Placement
from moempi.runtime.dispatch import Exchanger, probe_exchange_step, probe_network
from moempi.runtime.heap import keep_freed_memory
from moempi.runtime.pipeline import TIMINGS, Context, Telemetry, run_batch, split_rows
from moempi.runtime.stall import WatchedScheduler, Watchdog
from moempi.runtime.weights import load_weights


# what each /timings dataset measures, per rank and layer (stored as its description)
TIMING_MEANING = {
    "gate": "norm, gating and routing", "dispatch": "dispatch exchanges, posting to completion",
    "expert": "expert MLP compute (the dense MLP in dense layers)",
    "pack": "gathering, BF16 rounding and un-permuting exchange buffers",
    "compute": "all local work of the layer (everything but MPI calls and waiting)",
    "combine": "combine exchanges, posting to completion",
    "wait": "time blocked waiting for the layer's exchanges",
    "busy": "time running the layer's code, MPI calls included",
    "overall": "busy + wait: the layer's wall time on this rank",
    "pure_comm": "the layer's exchanges replayed alone, without compute",
}


def say(comm: MPI.Comm, msg: str) -> None:
    """Print on rank 0 only: the one place the job talks to the user."""
    if comm.rank == 0:
        print(msg, flush=True)


@dataclass(frozen=True)
class Setup:
    """What rank 0 read and checked, broadcast to every rank."""

    meta: ModelMeta
    placement: Placement
    num_tokens: int
    notes: tuple = ()            # warnings for the user: questionable but accepted input


def prepare(cfg: Config, ep: int) -> Setup:
    """Rank 0: validate model metadata and datasets, tokens, placement and output path."""
    run = cfg.run
    with hdf5.open_h5(run.model, "model") as f:      # one open: metadata, then every dataset
        meta = hdf5.meta_from_file(f, run.model)
        hdf5.check_model_datasets(f, meta, run.model)
    num_tokens, hidden = hdf5.tokens_shape(run.tokens)
    if num_tokens == 0:
        raise MoempiError(f"{run.tokens}: /tokens has no rows: nothing to run")
    if hidden != meta.hidden_size:
        raise MoempiError(f"{run.tokens}: tokens have hidden size {hidden} but the model "
                          f"{run.model} has {meta.hidden_size}")
    notes = []
    if run.placement:
        placement = Placement.load(run.placement, meta.moe_layers)
        placement.validate(ep, meta.num_experts, cfg.parallel.allow_packing, run.placement)
        if placement.defaulted:
            notes.append(f"placement {run.placement} lists no hosts for MoE layer(s) "
                         f"{layer_ranges(placement.defaulted)}: they use the default "
                         "placement (docs/design.md §2.4)")
    else:
        placement = Placement.default(meta.num_experts, ep, meta.moe_layers)
        if meta.num_experts > ep:
            notes.append(f"{meta.num_experts} experts on {ep} ranks: packing "
                         f"{-(-meta.num_experts // ep)} experts per rank (default placement)")
    inputs = {"model": run.model, "tokens": run.tokens, "placement": run.placement}
    hdf5.check_output_path(run.output, run.overwrite, inputs)
    notes += files.sweep(run.output)
    if run.checkpoint:
        check_checkpoint_path(run.checkpoint, inputs)
        notes += files.sweep(run.checkpoint) if os.path.isdir(run.checkpoint) else []
    return Setup(meta, placement, num_tokens, tuple(notes))


def layer_ranges(layers) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    runs, layers = [], sorted(layers)
    for l in layers:
        if runs and l == runs[-1][1] + 1:
            runs[-1][1] = l
        else:
            runs.append([l, l])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class Progress:
    """Rank 0's report of the slowest micro-batch's layer, at most every ``every`` seconds."""

    def __init__(self, num_layers: int, num_batches: int, every: float = 2.0):
        self.num_layers, self.num_batches, self.every = num_layers, num_batches, every
        self.start = self.last = time.perf_counter()
        self.batch = 0
        self.reached: dict[int, int] = {}

    def new_batch(self, batch: int, micro_batches: int) -> None:
        self.batch = batch
        self.reached = {m: -1 for m in range(micro_batches)}

    def __call__(self, micro_batch: int, layer: int) -> None:
        self.reached[micro_batch] = layer
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            low = min(self.reached.values()) + 1
            print(f"  batch {self.batch + 1}/{self.num_batches}: layer {low}/{self.num_layers} "
                  f"done by every micro-batch, {now - self.start:.1f} s", flush=True)


def check_memory(cfg: Config, meta: ModelMeta, layout, num_tokens: int, capacity: float):
    """Refuse a run whose weights and buffers cannot fit one GPU, naming the TP that would
    (the performance model's memory formulas, :mod:`moempi.perf.memory`)."""
    from moempi.perf.memory import check_fits
    tokens = -(-num_tokens // layout.world.size)
    if cfg.pipeline.batch_tokens:
        tokens = min(tokens, cfg.pipeline.batch_tokens)
    bf16 = cfg.run.precision == "bf16"
    check_fits(meta, layout.ep, cfg.parallel.tp, tokens, max(1, cfg.pipeline.micro_batches),
               capacity, wire_bytes=2 if bf16 else 4,
               weight_bytes=2 if bf16 and cfg.backend.name != "numpy" else 4, source="run")


def choose_micro_batches(cfg: Config, comm: MPI.Comm, meta: ModelMeta, tokens_per_rank: int,
                         gpu: bool = False) -> tuple[int, dict]:
    """The micro-batch count: the config's, or the performance model's choice from a probe
    (this rank's; the caller broadcasts rank 0's)."""
    if cfg.pipeline.micro_batches:
        return cfg.pipeline.micro_batches, {}
    if not cfg.pipeline.overlap:
        return 1, {}
    from moempi.perf.analytic import EXCHANGE_PHASES
    from moempi.perf.analytic import choose_micro_batches as model_choice
    wire_bytes = 2 if cfg.run.precision == "bf16" else 4
    latency, bandwidth = probe_network(comm, meta.hidden_size, wire_bytes)
    step = probe_exchange_step(comm, meta.hidden_size, meta.num_experts, cfg.run.precision,
                               meta.top_k)
    # an empty exchange step costs the network's latency per phase plus host work that no
    # overlap hides: the model's fixed cost per micro-batch and layer.  On the CPU backend
    # all of it is host work on the cores that compute (the copies too), so none is hidden.
    overhead = step if not gpu else max(0.0, step - EXCHANGE_PHASES * latency)
    gemm_flops = probe_gemm(meta)
    m = model_choice(tokens_per_rank, meta, comm.size, gemm_flops, latency, bandwidth,
                     wire_bytes, cfg.pipeline.max_micro_batches, overhead) if tokens_per_rank else 1
    return int(max(1, m)), {"latency_s": latency, "exchange_step_s": step,
                            "bandwidth_Bps": bandwidth, "gemm_flops": gemm_flops}


def probe_gemm(meta: ModelMeta, rows: int = 64) -> float:
    """Achieved expert-MLP FLOP/s of this rank on ``rows`` tokens (best of 3)."""
    w_in = np.zeros((meta.hidden_size, meta.moe_ffn_size), dtype=np.float32)
    w_out = np.zeros((meta.moe_ffn_size, meta.hidden_size), dtype=np.float32)
    h = np.ones((rows, meta.hidden_size), dtype=np.float32)
    best = min(_timed(lambda: mlp(h, w_in, w_out, meta.activation)) for _ in range(3))
    return 4.0 * rows * meta.hidden_size * meta.moe_ffn_size / max(best, 1e-9)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_job(world: MPI.Comm, cfg: Config, command_line: str) -> str:
    """The whole job on every rank; returns the output path.  Raises CollectiveError on bad input."""
    started = time.perf_counter()
    keep_freed_memory()            # reuse freed temporaries instead of faulting them in again
    cfg = parallel.root_call(world, cfg.validate)
    layout = parallel.agree(world, parallel.make_layout, world, cfg.parallel.ep,
                            cfg.parallel.tp, cfg.parallel.dp)
    comm = layout.ep_comm
    if parallel.root_call(world, already_complete, cfg):
        say(world, f"{cfg.run.output} is complete (a finished run's checkpoint is still in "
                   f"{cfg.run.checkpoint}): nothing to do")
        return cfg.run.output
    setup = parallel.root_call(world, prepare, cfg, layout.ep)
    meta, placement = setup.meta, setup.placement
    for note in setup.notes:
        say(world, f"warning: {note}")
    say(world, f"moempi {__version__}: {world.size} ranks (ep={layout.ep}, dp={layout.dp}), "
               f"{meta.num_layers} layers ({meta.num_dense_layers} dense), {meta.num_experts} "
               f"experts, hidden {meta.hidden_size}, {setup.num_tokens} tokens, "
               f"precision {cfg.run.precision}")

    backend = parallel.agree(world, make_backend, cfg.backend.name, world, cfg.backend.cuda_aware)
    devices = world.gather(backend.describe(), root=0)
    if backend.gpu and world.rank == 0:
        say(world, "devices: " + "; ".join(f"rank {r}: {d}" for r, d in enumerate(devices)))
    capacity = cfg.run.gpu_memory_gb * 1e9 or backend.memory_bytes()
    if capacity:
        parallel.root_call(world, check_memory, cfg, meta, layout, setup.num_tokens, capacity)
    start, stop = split_rows(setup.num_tokens, world.size)[world.rank]   # this rank's tokens
    num_local, max_local = stop - start, -(-setup.num_tokens // world.size)
    batch = cfg.pipeline.batch_tokens or max(1, max_local)
    host = cfg.run.host_memory_gb * 1e9
    if not host:                 # the node's available memory, shared by its ranks
        host = (available_host_bytes() or 0) / parallel.node_ranks(world)
    if host:
        parallel.agree(world, check_host_memory, meta, layout.ep, num_local, min(batch, max_local),
                       2 if cfg.run.precision == "bf16" else 4, not backend.gpu, host)
    # NaN/Inf refused before any compute; batch by batch, as the forward pass reads them
    parallel.agree(world, hdf5.check_tokens, cfg.run.tokens, start, stop, batch)
    t = time.perf_counter()
    expert_to_device = None
    if backend.gpu and cfg.run.precision == "bf16":      # BF16 tensor-core GEMMs
        expert_to_device = lambda w: backend.to_device(w, ml_dtypes.bfloat16)  # noqa: E731
    weights = parallel.agree(world, load_weights, cfg.run.model, meta, placement, layout.ep_rank,
                             backend.to_device, expert_to_device)
    say(world, f"loaded weights in {time.perf_counter() - t:.1f} s "
               f"({weights.nbytes / 2**20:.1f} MiB on rank 0)")

    # batches: the balancing and checkpoint step; the same count on every rank
    num_batches = max(1, -(-max_local // batch))
    ckpt, done, resumed_micro = None, 0, 0
    if cfg.run.checkpoint:
        expected = fingerprint(cfg, world.size, setup.num_tokens, batch, placement)
        found = parallel.root_call(world, scan, cfg.run.checkpoint, expected)
        done, resumed_micro = found["done"], found["micro_batches"]
        ckpt = Checkpoint(world, cfg.run.checkpoint, expected, num_batches)
    if resumed_micro:            # the same micro-batches as before: the same arithmetic
        micro_batches, probe = resumed_micro, {}
    else:
        micro_batches, probe = choose_micro_batches(cfg, comm, meta, min(batch, max_local),
                                                    backend.gpu)
        micro_batches = world.bcast(micro_batches, root=0)   # one count for every replica
    mode = "overlapped" if cfg.pipeline.overlap else "blocking"
    say(world, f"{num_batches} batch(es) of up to {batch} tokens per rank, {micro_batches} "
               f"micro-batch(es), {mode} exchange")

    moe_layers = list(meta.moe_layers)
    tel = Telemetry(meta.num_layers, len(moe_layers), comm.size, meta.num_experts)
    routing = None
    if cfg.run.save_routing:
        routing = {m: (np.full((num_local, meta.top_k), -1, np.int32),
                       np.full((num_local, meta.top_k), -1, np.int32))
                   for m in range(len(moe_layers))}
    balancer = BiasBalancer(cfg.balance, len(moe_layers), meta.num_experts)
    ctx = Context(weights, placement, layout.ep_rank, layout.dp_index * layout.ep, balancer.bias,
                  tel, WatchedScheduler(tel), backend, routing, cfg.balance.capacity_factor,
                  cfg.balance.overflow == "reroute")
    progress = Progress(meta.num_layers, num_batches) if world.rank == 0 else None
    history = {"bias": [], "tokens_per_expert": []}    # per batch: the bias used, the load seen
    hidden = np.empty((num_local, meta.hidden_size), dtype=np.float32)
    if done:
        ckpt.restore(done, hidden, routing, tel, history, balancer.bias)
        say(world, f"resuming from checkpoint {cfg.run.checkpoint}: {done} of {num_batches} "
                   "batch(es) already done")
    exchangers = [Exchanger(comm, meta.hidden_size, meta.num_experts, cfg.run.precision,
                            blocking=not cfg.pipeline.overlap, backend=backend)
                  for _ in range(micro_batches)]
    watchdog = Watchdog(world, ctx.scheduler, cfg.pipeline.stall_timeout)
    ctx.on_layer_done = watchdog.progress(progress)
    try:
        t = last_report = time.perf_counter()
        for b in range(done, num_batches):
            watchdog.new_batch(b)
            lo, hi = min(b * batch, num_local), min((b + 1) * batch, num_local)
            before = tel.tokens_per_expert.copy()
            history["bias"].append(balancer.bias.copy())
            if progress:
                progress.new_batch(b, micro_batches)
            x = parallel.agree(world, hdf5.read_tokens, cfg.run.tokens, start + lo, start + hi)
            hidden[lo:hi] = run_batch(ctx, exchangers, x, lo, b)
            load = parallel.sum_to_all(world, tel.tokens_per_expert - before)   # [L_moe, E]
            history["tokens_per_expert"].append(load)
            balancer.update(load)
            if ckpt:
                ckpt.save(b, micro_batches, hidden[lo:hi], lo, routing, tel, history,
                          balancer.bias)
            now = time.perf_counter()
            if now - last_report > 2 or b == num_batches - 1:
                say(world, f"batch {b + 1}/{num_batches} done, {now - t:.1f} s")
                last_report = now
        forward_s = time.perf_counter() - t
        watchdog.close()
        if weights.final_norm is not None:
            hidden = rmsnorm(hidden, backend.to_host(weights.final_norm), meta.norm_eps)
        pure_comm = np.zeros(meta.num_layers)
        if cfg.pipeline.measure_pure_comm:
            for m, layer in enumerate(moe_layers):
                pure_comm[layer] = exchangers[0].replay(tel.exchanges_of(m))
    finally:
        for ex in exchangers:
            ex.close()

    elapsed = world.allreduce(forward_s, op=MPI.MAX)
    say(world, f"forward: {elapsed:.2f} s, {setup.num_tokens * (num_batches - done) / num_batches / max(elapsed, 1e-9):,.0f} tokens/s")
    attrs = dict(
        format="moempi-output", version=1, moempi_version=__version__,
        config=cfg.to_dict(), world_size=world.size, ep=layout.ep, dp=layout.dp,
        placement=placement.to_dict(), model_meta=dataclasses.asdict(meta),
        micro_batches=micro_batches, batch_tokens=batch, resumed_from_batch=done,
        probe=probe, versions=versions(), command_line=command_line, devices=devices,
        forward_seconds=elapsed, total_seconds=time.perf_counter() - started)
    if cfg.balance.enabled:
        vio = max_violation(np.stack(history["tokens_per_expert"])).mean(axis=1)
        say(world, f"load balancing: MaxVio (mean over layers) first batch {vio[0]:.3f}, "
                   f"last batch {vio[-1]:.3f}")
    write_output(world, cfg, meta, attrs, hidden, tel, pure_comm, routing, history)
    if ckpt:
        ckpt.remove()
    layout.free()
    say(world, f"wrote {cfg.run.output}")
    return cfg.run.output


def already_complete(cfg: Config) -> bool:
    """Rank 0: a restarted job whose output was written but whose checkpoint was not yet removed."""
    if not cfg.run.checkpoint or cfg.run.overwrite or not os.path.exists(cfg.run.output):
        return False
    return checkpoint_complete(cfg.run.checkpoint)


def overlap_percent(overall, compute, pure_comm):
    """OSU definition: ``max(0, 100 (1 - (overall - compute) / pure_comm))``; NaN without comm."""
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = 100.0 * (1.0 - (overall - compute) / pure_comm)
    return np.where(pure_comm > 0, np.maximum(pct, 0.0), np.nan)


def write_output(world, cfg: Config, meta: ModelMeta, attrs: dict, hidden: np.ndarray,
                 tel: Telemetry, pure_comm: np.ndarray, routing, history: dict) -> None:
    """Gather everything to rank 0 and write the output file (complete or absent)."""
    seconds = {name: parallel.gather_stack(world, tel.seconds[name]) for name in TIMINGS}
    pure = parallel.gather_stack(world, pure_comm)
    traffic = parallel.gather_stack(world, tel.traffic)             # [P, L_moe, ep]
    tokens_per_expert = parallel.sum_to_all(world, tel.tokens_per_expert)
    rows = parallel.gather_stack(world, tel.rows_computed)          # [P, L_moe]
    rerouted = parallel.sum_to_all(world, tel.rerouted)
    dropped = parallel.sum_to_all(world, tel.dropped)
    writer = None
    if world.rank == 0:
        writer = hdf5.OutputWriter(cfg.run.output, cfg.run.overwrite)
    try:
        if writer:
            writer.attrs(**attrs)
        _write_all(world, writer, meta, hidden, seconds, pure, traffic, tokens_per_expert, rows,
                   routing)
        if writer:
            loads = np.stack(history["tokens_per_expert"])            # [B, L_moe, E]
            writer.array("axes/batch", np.arange(len(loads)), scale="batch",
                         description="batch index (pipeline.batch_tokens per rank each)")
            writer.array("balance/bias", np.stack(history["bias"]),
                         dims="batch, moe layer, expert", note="bias used for each batch")
            writer.array("balance/tokens_per_expert", loads, dims="batch, moe layer, expert")
            writer.array("balance/max_violation", max_violation(loads), dims="batch, moe layer",
                         definition="max(load) / mean(load) - 1")
            writer.array("stats/rerouted", rerouted, dims="moe layer")
            writer.array("stats/dropped", dropped, dims="moe layer")
            writer.commit()
    except BaseException:
        if writer:
            writer.discard()
        raise


def _write_all(world, writer, meta, hidden, seconds, pure, traffic, tokens_per_expert, rows,
               routing) -> None:
    num_tokens = world.allreduce(len(hidden))
    starts = [start for start, _ in split_rows(num_tokens, world.size)]
    ds = writer.dataset("hidden", (num_tokens, meta.hidden_size), "f4", dims="token, hidden",
                        description="the stack's output (after the final norm, if the model has "
                                    "one), rows in the input token order", units="as /tokens"
                        ) if writer else None
    parallel.stream_rows_to_dataset(world, hidden, ds, starts)
    if routing is not None:
        home = np.full(len(hidden), world.rank, dtype=np.int32)
        hds = writer.dataset("routing/home_rank", (num_tokens,), "i4", dims="token",
                             description="the rank that owned the token") if writer else None
        parallel.stream_rows_to_dataset(world, home, hds, starts)
        for m, layer in enumerate(meta.moe_layers):
            for name, arr in zip(("topk_idx", "dest_rank"), routing[m]):
                rds = (writer.dataset(f"routing/{layer:03d}/{name}", (num_tokens, meta.top_k),
                                      "i4", dims="token, k") if writer else None)
                parallel.stream_rows_to_dataset(world, arr, rds, starts)
    if not writer:
        return
    P = world.size
    writer.array("axes/layer", np.arange(meta.num_layers), scale="layer",
                 description=f"layer index; layers 0..{meta.num_dense_layers - 1} are dense")
    writer.array("axes/rank", np.arange(P), scale="rank", description="MPI world rank")
    writer.array("axes/expert", np.arange(meta.num_experts), scale="expert",
                 description="expert index within a MoE layer")
    for name, data in seconds.items():
        writer.array(f"timings/{name}", data, units="s", dims="rank, layer",
                     description=TIMING_MEANING[name])
    busy, wait, compute = seconds["busy"], seconds["wait"], seconds["compute"]
    overall = busy + wait
    writer.array("timings/overall", overall, units="s", dims="rank, layer",
                 description=TIMING_MEANING["overall"])
    writer.array("timings/pure_comm", pure, units="s", dims="rank, layer",
                 description=TIMING_MEANING["pure_comm"])
    writer.array("timings/overlap", overlap_percent(overall, compute, pure), units="%",
                 dims="rank, layer",
                 definition="max(0, 100 * (1 - (overall - compute) / pure_comm))")
    moe = np.array(list(meta.moe_layers), dtype=np.int32)
    writer.array("stats/moe_layers", moe, scale="moe layer",
                 description="the layer index of each MoE layer (the moe layer axis)")
    writer.array("stats/tokens_per_expert", tokens_per_expert, dims="moe layer, expert",
                 units="(token, expert) pairs", description="pairs routed to each expert")
    writer.array("stats/tokens_per_rank", rows.T.copy(), dims="moe layer, rank",
                 units="rows", description="rows each rank's experts computed")
    # traffic: rows each rank sent to each rank of its expert group, as world ranks
    ep = traffic.shape[2]
    full = np.zeros((len(moe), P, P), dtype=np.int64)
    for src in range(P):
        base = (src // ep) * ep
        full[:, src, base:base + ep] = traffic[src]
    writer.array("stats/traffic", full, dims="moe layer, source rank, destination rank",
                 units="rows", description="rows each rank sent to each rank")


def versions() -> dict:
    import h5py
    import mpi4py
    return {"moempi": __version__, "python": sys.version.split()[0], "numpy": np.__version__,
            "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
            "mpi4py": mpi4py.__version__,
            "mpi": MPI.Get_library_version().splitlines()[0].strip()}
