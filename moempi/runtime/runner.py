"""The `moempi run` job: set-up on rank 0, the batched forward pass, the output file."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from mpi4py import MPI

from moempi import __version__
from moempi.io import files, hdf5
from moempi.model.balance import BiasBalancer, max_violation
from moempi.perf.predict import JobRun
from moempi.runtime import parallel, prediction, tune
from moempi.runtime.backend import make_backend
from moempi.runtime.checkpoint import (Checkpoint, check_checkpoint_path, checkpoint_complete, fingerprint, scan)
from moempi.errors import MoempiError
from moempi.io.config import Config
from moempi.model.shapes import ModelMeta
from moempi.perf.memory import available_host_bytes, check_host_memory
from moempi.place.placement import Placement
from moempi.runtime.dispatch import Exchanger
from moempi.runtime.nodes import NodeExchanger
from moempi.runtime.heap import keep_freed_memory
from moempi.runtime.output import OutputFile, peak_host_bytes, versions
from moempi.runtime.pipeline import Context, Telemetry, run_batch, split_rows
from moempi.runtime.replay import replay_pure_comm
from moempi.runtime.stall import WatchedScheduler, Watchdog
from moempi.runtime.weights import compare_replicas, load_weights, load_weights_from_root


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


def prepare(cfg: Config, ep: int, tp: int = 1) -> Setup:
    """Rank 0: validate model metadata and datasets, tokens, placement and output path."""
    run = cfg.run
    with hdf5.open_h5(run.model, "model") as f:      # one open: metadata, then every dataset
        meta = hdf5.meta_from_file(f, run.model)
        hdf5.check_model_datasets(f, meta, run.model)
    if meta.moe_ffn_size % tp:
        raise MoempiError(f"parallel.tp = {tp} does not divide the expert hidden size "
                          f"{meta.moe_ffn_size} of {run.model}")
    if cfg.balance.capacity_factor > 0 and (meta.router != "softmax" or
                                            meta.routed_scaling_factor != 1.0):
        raise MoempiError(f"balance.capacity_factor > 0: capacity is implemented for the "
                          f"unscaled softmax router only, and {run.model} routes by "
                          f"{meta.router}" + (f" scaled by {meta.routed_scaling_factor}"
                                              if meta.routed_scaling_factor != 1.0 else ""))
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

    def new_segment(self, micro_batches: int, first_layer: int) -> None:
        """A run of layers from ``first_layer`` on in ``micro_batches`` (the tuner's)."""
        self.reached = {m: first_layer - 1 for m in range(micro_batches)}

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
    setup = parallel.root_call(world, prepare, cfg, layout.ep, layout.tp)
    meta, placement = setup.meta, setup.placement
    calibration = parallel.root_call(world, prediction.load_calibration, cfg.run.calibration)
    for note in setup.notes:
        say(world, f"warning: {note}")
    say(world, f"moempi {__version__}: {world.size} ranks (ep={layout.ep}, tp={layout.tp}, "
               f"dp={layout.dp}), "
               f"{meta.num_layers} layers ({meta.num_dense_layers} dense), {meta.num_experts} "
               f"experts, hidden {meta.hidden_size}, {setup.num_tokens} tokens, "
               f"precision {cfg.run.precision}")

    backend = parallel.agree(world, make_backend, cfg.backend.name, world, cfg.backend.cuda_aware)
    node_ranks = parallel.node_ranks(world)      # the ranks sharing this rank's node
    start, stop = split_rows(setup.num_tokens, world.size)[world.rank]   # this rank's tokens
    num_local, max_local = stop - start, -(-setup.num_tokens // world.size)
    # every rank's figure alike (the largest rank's tokens), so every rank makes one choice
    backend.kernels, kernels = tune.local_kernels(
        cfg.pipeline.local_kernels, backend.gpu,
        max_local * meta.top_k * meta.hidden_size * len(meta.moe_layers))
    if kernels["mode"] == "compiled":
        say(world, f"exchange's local steps compiled ({kernels['reason']}): loaded in "
                   f"{world.allreduce(kernels['load_seconds'], op=MPI.MAX):.2f} s")
    devices = world.gather(backend.describe(), root=0)
    if backend.gpu and world.rank == 0:
        say(world, "devices: " + "; ".join(f"rank {r}: {d}" for r, d in enumerate(devices)))
    capacity = cfg.run.gpu_memory_gb * 1e9 or backend.memory_bytes()
    if capacity:
        parallel.root_call(world, check_memory, cfg, meta, layout, setup.num_tokens, capacity)
    batch = cfg.pipeline.batch_tokens or max(1, max_local)
    host = cfg.run.host_memory_gb * 1e9
    if not host:                 # the node's available memory, shared by its ranks
        host = (available_host_bytes() or 0) / node_ranks
    if host:
        parallel.agree(world, check_host_memory, meta, layout.ep, min(batch, max_local),
                       2 if cfg.run.precision == "bf16" else 4, not backend.gpu, host, "run",
                       layout.tp)
    # NaN/Inf refused before any compute; batch by batch, as the forward pass reads them
    parallel.agree(world, hdf5.check_tokens, cfg.run.tokens, start, stop, batch)
    t = time.perf_counter()
    expert_to_device = None
    if backend.gpu and cfg.run.precision == "bf16":      # BF16 tensor-core GEMMs
        expert_to_device = lambda w: backend.to_device(w, ml_dtypes.bfloat16)  # noqa: E731
    check = layout.dp > 1              # replicas: compare what each holds before any compute
    if cfg.run.weights == "rank0":
        weights, sums = parallel.agree(world, load_weights_from_root, world, cfg.run.model,
                                       meta, placement, layout.ep, backend.to_device,
                                       expert_to_device, check, layout.tp)
    else:
        weights, sums = parallel.agree(world, load_weights, cfg.run.model, meta, placement,
                                       layout.ep_rank, backend.to_device, expert_to_device,
                                       check, layout.tp, layout.tp_rank)
    load_s = time.perf_counter() - t
    say(world, f"loaded weights in {load_s:.1f} s ({weights.nbytes / 2**20:.1f} MiB on rank 0, "
               + ("read by rank 0 and sent)" if cfg.run.weights == "rank0" else
                  "each rank reading its own)"))
    replica_check = {}
    if check:
        mismatch = compare_replicas(world, sums)
        parallel.root_call(world, _refuse, mismatch)
        seconds = world.allreduce(sums["seconds"], op=MPI.MAX) + time.perf_counter() - t - load_s
        replica_check = {"arrays": len(sums["arrays"]), "seconds": seconds}
        say(world, f"replicas verified: every rank's {len(sums['arrays'])} arrays match their "
                   f"copies in the other {layout.dp - 1} replica(s) (CRC-32, {seconds:.2f} s)")

    # batches: the balancing and checkpoint step; the same count on every rank
    num_batches = max(1, -(-max_local // batch))
    ckpt, done, resumed_micro = None, 0, 0
    if cfg.run.checkpoint:
        expected = fingerprint(cfg, world.size, setup.num_tokens, batch, placement)
        found = parallel.root_call(world, scan, cfg.run.checkpoint, expected)
        done, resumed_micro = found["done"], found["micro_batches"]
        ckpt = Checkpoint(world, cfg.run.checkpoint, expected, num_batches)
    moe_layers = list(meta.moe_layers)
    tel = Telemetry(meta.num_layers, len(moe_layers), comm.size, meta.num_experts)
    balancer = BiasBalancer(cfg.balance, len(moe_layers), meta.num_experts)
    for m, layer in enumerate(l for l in weights.layers if l.index in moe_layers):
        if layer.score_bias is not None:     # DeepSeek-V3: the balancer starts from it
            balancer.bias[m] = layer.score_bias
    gpus_per_node = placement.gpus_per_node or node_ranks
    if cfg.pipeline.dispatch == "node":
        parallel.root_call(world, check_node_dispatch, layout, backend, gpus_per_node)
    # the micro-batch count: the checkpoint's (the same arithmetic), the config's, 1 without
    # overlap, or timed over these candidates
    given = resumed_micro or cfg.pipeline.micro_batches or (0 if cfg.pipeline.overlap else 1)
    counts = [given] if given else \
        tune.candidates(min(batch, max_local), cfg.pipeline.max_micro_batches)
    # the expert GEMM chunk (CPU, overlapped, more than one micro-batch): the config's or
    # measured, a multiple of the BLAS's row quantum, checked to change no bit
    chunking = {"chunk": 0, "quantum": 0, "rates": {}, "seconds": 0.0}

    def measure_chunk():
        """Measured once, before the first pass with more than one micro-batch (or, with a
        shared expert, at start-up): at H 7168 the GEMM timings take seconds, which a job
        that keeps 1 never pays."""
        if chunking["seconds"]:
            return
        t = time.perf_counter()
        chunk, quantum, rates = tune.chunk_rows(meta, world, cfg.pipeline.chunk_rows, repeats=1)
        chunking.update(chunk=chunk, quantum=quantum, rates=rates,
                        seconds=time.perf_counter() - t)
        ctx.chunk_rows = chunk
        if not chunk:
            say(world, "expert GEMMs are not cut into chunks: no chunk size of this BLAS "
                       "reproduces the whole GEMM bit for bit on these shapes")

    # a shared expert is computed in chunks while the dispatch is in flight, at any count
    shared = meta.shared_ffn_size > 0 and len(moe_layers) > 0
    measures_chunk = not backend.gpu and cfg.pipeline.overlap and (counts != [1] or shared)
    ctx = Context(weights, placement, layout.ep_rank, layout.rank_offset, balancer.bias,
                  tel, WatchedScheduler(tel), backend, None, cfg.balance.capacity_factor,
                  cfg.balance.overflow == "reroute", tp=layout.tp)
    if measures_chunk and (len(counts) == 1 or shared):   # cut from the start
        measure_chunk()
    # the time model's figures for the prediction recorded beside the measurement: the
    # calibration's, or else the run's own (an Alltoallv probe and an expert's GEMM rate)
    probes = None if calibration else prediction.probe(
        comm, weights, backend, min(batch, max_local), 2 if cfg.run.precision == "bf16" else 4)
    progress = Progress(meta.num_layers, num_batches) if world.rank == 0 else None
    history = {"bias": [], "tokens_per_expert": []}    # per batch: the bias used, the load seen
    final_norm = None if weights.final_norm is None else backend.to_host(weights.final_norm)
    output = parallel.agree(world, OutputFile, world, cfg.run.output, cfg.run.overwrite, meta,
                            setup.num_tokens, start, final_norm, cfg.run.save_routing)
    exchangers = []
    try:
        if done:
            ckpt.restore(done, output, cfg.run.save_routing, tel, history, balancer.bias)
            say(world, f"resuming from checkpoint {cfg.run.checkpoint}: {done} of "
                       f"{num_batches} batch(es) already done")
        exchangers = [make_exchanger(cfg, comm, meta, backend, gpus_per_node)
                      for _ in range(max(counts))]
        micro_batches = counts[0] if len(counts) == 1 else 0     # 0: chosen in the first batch
        tuning = None
        mode = "overlapped" if cfg.pipeline.overlap else "blocking"
        count_text = str(micro_batches) if micro_batches else \
            f"{'/'.join(map(str, counts))} (chosen while the first batch runs)"
        say(world, f"{num_batches} batch(es) of up to {batch} tokens per rank, {count_text} "
                   f"micro-batch(es), {mode} exchange" + (f", expert GEMMs in chunks of {ctx.chunk_rows} "
                                                         "rows while exchanges are in flight"
                                                         if ctx.chunk_rows else ""))
        watchdog = Watchdog(world, ctx.scheduler, cfg.pipeline.stall_timeout)
        ctx.on_layer_done = watchdog.progress(progress)
        if progress:
            ctx.on_segment = progress.new_segment
        startup_s = time.perf_counter() - started
        t = last_report = time.perf_counter()
        for b in range(done, num_batches):
            watchdog.new_batch(b)
            lo, hi = min(b * batch, num_local), min((b + 1) * batch, num_local)
            before = tel.tokens_per_expert.copy()
            history["bias"].append(balancer.bias.copy())
            if progress:
                progress.new_batch(b, micro_batches or counts[0])
            if cfg.run.save_routing:     # this batch's routing, filled by the forward pass
                ctx.routing = {m: (np.full((hi - lo, meta.top_k), -1, np.int32),
                                   np.full((hi - lo, meta.top_k), -1, np.int32))
                               for m in range(len(moe_layers))}
            x = parallel.agree(world, hdf5.read_tokens, cfg.run.tokens, start + lo, start + hi)
            if micro_batches:
                rows = run_batch(ctx, exchangers, x, 0, b)
            else:                 # the first batch chooses the count, on its own layers
                rows, tuning = tune.tuned_batch(world, ctx, exchangers, x, b, counts,
                                                len(moe_layers) * (num_batches - done),
                                                cfg.pipeline.tuning_budget,
                                                measure_chunk if measures_chunk else None)
                micro_batches = tuning.chosen
                for ex in exchangers[micro_batches:]:
                    ex.close()
                del exchangers[micro_batches:]
                say(world, tuning_line(tuning))
            load = parallel.sum_to_all(world, tel.tokens_per_expert - before)   # [L_moe, E]
            history["tokens_per_expert"].append(load)
            balancer.update(load)
            if ckpt:
                ckpt.save(b, micro_batches, rows, lo, ctx.routing, tel, history, balancer.bias)
            output.batch(lo, rows, ctx.routing)
            now = time.perf_counter()
            if now - last_report > 2 or b == num_batches - 1:
                say(world, f"batch {b + 1}/{num_batches} done, {now - t:.1f} s")
                last_report = now
        forward_s = time.perf_counter() - t
        watchdog.close()
        elapsed = world.allreduce(forward_s, op=MPI.MAX)
        t = time.perf_counter()
        pure_comm = np.zeros(meta.num_layers)
        replayed = np.zeros(meta.num_layers, dtype=bool)
        if cfg.pipeline.measure_pure_comm:
            pure_comm, replayed = replay_pure_comm(
                world, exchangers[0], tel, moe_layers, meta.num_layers,
                cfg.pipeline.pure_comm_layers, elapsed)
            say(world, f"overlap %: exchanges replayed alone on {int(replayed.sum())} of "
                       f"{len(moe_layers)} MoE layers (pipeline.pure_comm_layers = "
                       f"{cfg.pipeline.pure_comm_layers}), the others estimated from their rows"
                if replayed.any() else
                "overlap %: not measured: replaying even one layer's exchanges could cost more "
                "than 2 % of this forward (pipeline.pure_comm_layers = all replays every layer)")
        replay_s = time.perf_counter() - t
        for ex in exchangers:
            ex.close()
        exchangers = []

        tuning_s = tuning.cost_s if tuning else 0.0
        peak = world.allreduce(peak_host_bytes(), op=MPI.MAX)
        # ranks against the cores they may run on (rank 0's node): `inspect` explains the
        # overlap % by it (MPI's copies and the other ranks' compute then share the cores)
        node = {"ranks": node_ranks, "cores": len(os.sched_getaffinity(0))}
        say(world, f"forward: {elapsed:.2f} s, {setup.num_tokens * (num_batches - done) / num_batches / max(elapsed, 1e-9):,.0f} tokens/s; "
                   f"peak host memory {peak / 2**20:,.0f} MiB (the largest rank); tuning cost "
                   f"{tuning_s:.2f} s ({tuning_s / max(elapsed, 1e-9):.1%} of the forward)")
        attrs = dict(
            format="moempi-output", version=1, moempi_version=__version__,
            config=cfg.to_dict(), world_size=world.size, ep=layout.ep, tp=layout.tp,
            dp=layout.dp,
            placement=placement.to_dict(), model_meta=dataclasses.asdict(meta),
            micro_batches=micro_batches, batch_tokens=batch, resumed_from_batch=done,
            weights_seconds=load_s, replica_check=replica_check,
            dispatch=cfg.pipeline.dispatch, gpus_per_node=gpus_per_node,
            pure_comm_replayed=[int(l) for l in np.flatnonzero(replayed)],
            tuning={"micro_batches": tuning.to_dict() if tuning else None,
                    "cost_share_of_forward": tuning_s / max(elapsed, 1e-9),
                    "chunk_rows": chunking["chunk"], "row_quantum": chunking["quantum"],
                    "chunk_seconds": chunking["seconds"], "local_kernels": kernels,
                    "gemm_flops_by_rows": {str(r): f for r, f in chunking["rates"].items()}},
            phase_seconds={"start_up": world.allreduce(startup_s, op=MPI.MAX),
                           "weights": load_s, "tuning": tuning_s,
                           "forward": elapsed - tuning_s,
                           "replay": world.allreduce(replay_s, op=MPI.MAX)},
            versions=versions(), command_line=command_line, devices=devices, node=node,
            mpi_env={k: v for k, v in os.environ.items() if k.startswith("MPIR_CVAR_")},
            forward_seconds=elapsed, total_seconds=time.perf_counter() - started)
        if cfg.balance.enabled:
            vio = max_violation(np.stack(history["tokens_per_expert"])).mean(axis=1)
            say(world, f"load balancing: MaxVio (mean over layers) first batch {vio[0]:.3f}, "
                       f"last batch {vio[-1]:.3f}")
        job = JobRun(ranks=layout.ep * layout.tp, tokens_per_rank=max_local,
                     micro_batches=max(1, micro_batches), precision=cfg.run.precision,
                     overlap=cfg.pipeline.overlap, tp=layout.tp, batch_tokens=batch,
                     dispatch=cfg.pipeline.dispatch, gpus_per_node=gpus_per_node)
        forecast = prediction.RunForecast(meta, job, calibration, cfg.run.calibration, probes,
                                          chunking["rates"])
        predicted = output.finish(attrs, tel, pure_comm, history, gpus_per_node, forecast)
        if predicted:
            say(world, predicted.line(elapsed))
    except BaseException:
        output.discard()
        raise
    finally:
        for ex in exchangers:
            ex.close()
    if ckpt:
        ckpt.remove()
    layout.free()
    say(world, f"wrote {cfg.run.output}")
    return cfg.run.output


def tuning_line(tuning) -> str:
    """One line on the micro-batch choice: what each count's trial layers took, what it cost."""
    tried = ", ".join(f"{m}: {ts[0] * 1e3:.1f} ms" for m, ts in tuning.layer_seconds.items() if ts)
    return (f"micro-batch count {tuning.chosen}, chosen on the first batch's own layers ("
            + (f"one MoE layer each: {tried}" if tried else "no trial") +
            f"; {tuning.reason}); cost {tuning.cost_s * 1e3:.1f} ms of a budget of "
            f"{tuning.budget_s * 1e3:.1f} ms")


def check_node_dispatch(layout, backend, gpus_per_node: int) -> None:
    """Rank 0: what ``pipeline.dispatch = "node"`` needs in this version."""
    group = layout.ep * layout.tp
    if layout.tp > 1:
        raise MoempiError("pipeline.dispatch = node: not with parallel.tp > 1 in this version "
                          "(use pipeline.dispatch = direct)")
    if backend.gpu:
        raise MoempiError("pipeline.dispatch = node: the numpy backend only in this version "
                          "(use pipeline.dispatch = direct)")
    if group % gpus_per_node:
        raise MoempiError(f"pipeline.dispatch = node: the {group} ranks of a replica are not "
                          f"whole nodes of {gpus_per_node} (run.placement's topology "
                          "gpus_per_node)")


def make_exchanger(cfg: Config, comm, meta: ModelMeta, backend, gpus_per_node: int):
    """One micro-batch's exchange channel: direct, or node-deduplicated (two stages)."""
    blocking = not cfg.pipeline.overlap
    if cfg.pipeline.dispatch == "node":
        return NodeExchanger(comm, gpus_per_node, meta.hidden_size, meta.num_experts,
                             meta.top_k, cfg.run.precision, blocking, backend)
    return Exchanger(comm, meta.hidden_size, meta.num_experts, cfg.run.precision,
                     blocking=blocking, backend=backend)


def _refuse(mismatch: str | None) -> None:
    if mismatch:
        raise MoempiError(mismatch)


def already_complete(cfg: Config) -> bool:
    """Rank 0: a restarted job whose output was written but whose checkpoint was not yet removed."""
    if not cfg.run.checkpoint or cfg.run.overwrite or not os.path.exists(cfg.run.output):
        return False
    return checkpoint_complete(cfg.run.checkpoint)
