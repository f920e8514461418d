"""The `moempi` command line (click); MPI is imported inside the commands that use it."""

from __future__ import annotations

import math
import os
import shlex
import sys
import threading

import click

from moempi import __version__, errors
from moempi.errors import CollectiveError, MoempiError
from moempi.model.shapes import ACTIVATIONS, PRESETS, WEIGHT_DTYPES
from moempi.runtime import signals

PROGRESS_BYTES = 256 << 20      # writes at least this large show a progress bar


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moempi")
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected failure "
              "(otherwise one line: out of memory, disk full, ...).")
def cli(debug):
    """moempi: the forward pass of a DeepSeek-V3-shaped Mixture-of-Experts stack with
    large expert parallelism: one MPI rank per GPU, each rank owning one expert of every
    MoE layer, tokens exchanged with (nonblocking) Alltoallv, layer by layer.

    \b
    Typical session:
      moempi init-model model.h5 --preset small
      moempi make-tokens tokens.h5 --num-tokens 4096 --model model.h5
      mpiexec -n 4 moempi run --model model.h5 --tokens tokens.h5 --output out.h5
      moempi inspect out.h5
    """
    errors.DEBUG = debug


def main():
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MoempiError as exc:
        click.echo(f"moempi: error: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:                 # a serial command (init-model, make-tokens, ...)
        if errors.DEBUG:
            click.echo(errors.traceback_text(exc), err=True)
        click.echo(f"moempi: error: {errors.describe(exc)}", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        # after a failed write HDF5 can crash the interpreter's teardown; the temporary
        # file is already removed, so skip it
        os._exit(1)


# -- synthetic inputs -----------------------------------------------------------------------
@cli.command("init-model")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True,
              help="Base shape: tiny (6 layers, unit tests), small (61 layers, 4 experts, "
                   "hidden 256: the demo), deepseek-v3 (61 layers, 256 experts, hidden 7168), "
                   "deepseek-v3-full (the same with DeepSeek-V3's gated experts, top-8 "
                   "sigmoid routing in 4 of 8 groups, shared expert, correction bias).")
@click.option("--experts", type=int, help="Experts per MoE layer.")
@click.option("--layers", type=int, help="Total layers.")
@click.option("--dense-layers", type=int, help="Leading dense layers.")
@click.option("--hidden", type=int, help="Hidden size H.")
@click.option("--ffn", type=int, help="Expert MLP hidden size F.")
@click.option("--dense-ffn", type=int, help="Dense MLP hidden size Fd.")
@click.option("--top-k", type=int, help="Experts per token.")
@click.option("--shared-ffn", type=int, help="Hidden size of the shared expert (0: none); "
              "with a preset that has one, it follows --ffn unless given.")
@click.option("--activation", type=click.Choice(ACTIVATIONS), help="Expert activation.")
@click.option("--dtype", type=click.Choice(WEIGHT_DTYPES), help="Weight storage dtype "
              "(bfloat16 is stored as uint16 with encoding=\"bfloat16\").")
@click.option("--no-final-norm", is_flag=True, help="Leave out /final_norm.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
def init_model(out, preset, experts, layers, dense_layers, hidden, ffn, dense_ffn, top_k,
               shared_ffn, activation, dtype, no_final_norm, seed, overwrite):
    """Write a random model checkpoint OUT (HDF5, docs/design.md §2.1), one expert slab at a time."""
    from moempi.io.files import check_free_space
    from moempi.io.hdf5 import model_shapes, write_model
    signals.install()
    changes = {k: v for k, v in dict(num_experts=experts, num_layers=layers,
                                      num_dense_layers=dense_layers, hidden_size=hidden,
                                      moe_ffn_size=ffn, dense_ffn_size=dense_ffn, top_k=top_k,
                                      activation=activation, weight_dtype=dtype,
                                      shared_ffn_size=shared_ffn).items()
               if v is not None}
    base = PRESETS[preset]
    if shared_ffn is None and ffn is not None and base.shared_ffn_size:
        # DeepSeek-V3's shared expert is n_shared_experts x the expert width: keep the ratio
        changes["shared_ffn_size"] = ffn * base.shared_ffn_size // base.moe_ffn_size
    if layers is not None and dense_layers is None:
        # `--preset deepseek-v3-full --layers 2`: the preset's dense layers, as many as fit
        changes["num_dense_layers"] = min(base.num_dense_layers, layers)
    meta = base.replace(**changes, has_final_norm=not no_final_norm).validate(out)
    _check_new_file(out, overwrite)
    size = sum(math.prod(shape) for shape in model_shapes(meta).values()) * meta.weight_bytes
    check_free_space(out, size)
    click.echo(f"writing {out}: {meta.num_layers} layers, {meta.num_experts} experts, hidden "
               f"{meta.hidden_size}, {meta.weight_dtype}, {size / 2**30:.2f} GiB"
               + (f"; {', '.join(meta.features)}" if meta.features else ""))
    with _progress(size, meta.num_layers, "layers") as bar:
        write_model(out, meta, seed, lambda done, total: bar.update(1), overwrite)


def _progress(nbytes: int, steps: int, what: str):
    """A progress bar on stderr over ``steps`` for a write of ``nbytes`` (hidden when small)."""
    return click.progressbar(length=steps, label=f"  {what}", file=sys.stderr, show_pos=True,
                             hidden=nbytes < PROGRESS_BYTES)


@cli.command("convert")
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--layers", type=int, help="Keep only the first N layers.")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="Storage dtype of the weights (bf16 as uint16 with encoding=\"bfloat16\"; "
                   "FP8 weights are dequantised by their block scales first).")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
def convert(src, out, layers, dtype, overwrite):
    """Convert a Hugging Face model folder SRC (config.json + safetensors) to a moempi model
    file OUT (docs/design.md §2.1): MixtralForCausalLM, Qwen2MoeForCausalLM,
    Qwen3MoeForCausalLM, DeepseekV3ForCausalLM.  Streams one tensor at a time; keeps the
    post-attention norms, routers, experts, dense and shared MLPs and the final norm, and
    leaves out attention (moempi's stack has none)."""
    from moempi.io.convert import convert as run_convert
    signals.install()
    _check_new_file(out, overwrite)
    bar = click.progressbar(length=1, label="  tensors", file=sys.stderr, show_pos=True)

    def progress(done, total):
        bar.length = total
        bar.update(done - bar.pos)

    lines = []                      # the summary, said after the bar so as not to cut it
    with bar:
        run_convert(src, out, layers, dtype, overwrite, progress, say=lines.append)
    for line in lines:
        click.echo(line)


@cli.command("make-tokens")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--num-tokens", "-n", type=int, required=True, help="Number of tokens N.")
@click.option("--model", type=click.Path(dir_okay=False), help="Take the hidden size from this model.")
@click.option("--hidden", type=int, help="Hidden size H (instead of --model).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
def make_tokens(out, num_tokens, model, hidden, seed, dtype, overwrite):
    """Write N synthetic tokens /tokens [N, H] (seeded normal values) to OUT."""
    from moempi.io.files import check_free_space, check_not_input
    from moempi.io.hdf5 import TOKEN_CHUNK, read_model_meta, write_tokens
    signals.install()
    if (model is None) == (hidden is None):
        raise MoempiError("make-tokens: give exactly one of --model and --hidden")
    if model:
        hidden = read_model_meta(model).hidden_size
        check_not_input(out, {"model": model})
    _check_new_file(out, overwrite)
    size = num_tokens * hidden * (4 if dtype == "float32" else 2)
    check_free_space(out, size)
    with _progress(size, -(-num_tokens // TOKEN_CHUNK), f"{TOKEN_CHUNK}-token chunks") as bar:
        write_tokens(out, num_tokens, hidden, seed, dtype, overwrite,
                     lambda done: bar.update(1))
    click.echo(f"wrote {out}: {num_tokens} tokens, hidden {hidden}, {dtype}")


def _check_new_file(out: str, overwrite: bool) -> None:
    """Before writing ``out``: it may be replaced only with --overwrite; a dead process's
    temporary files of it are removed (or named, when they may be another job's)."""
    from moempi.io.files import sweep
    if os.path.isdir(out):
        raise MoempiError(f"{out}: is a directory (name a file)")
    if os.path.exists(out) and not overwrite:
        raise MoempiError(f"{out}: exists (pass --overwrite to replace it)")
    for note in sweep(out):
        click.echo(f"moempi: warning: {note}", err=True)


# -- the job -------------------------------------------------------------------------------
@cli.command("run")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--model", help="Model file (run.model).")
@click.option("--tokens", help="Tokens file (run.tokens).")
@click.option("--output", "-o", help="Output file (run.output).")
@click.option("--placement", help="Placement JSON (run.placement); default: docs/design.md §2.4 rule.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]),
              help="fp32: exact mode; bf16: BF16 on the wire, float32 accumulation.")
@click.option("--micro-batches", type=int,
              help="Micro-batches in flight (0 = chosen while the first batch runs, on its "
                   "own layers, within pipeline.tuning_budget).")
@click.option("--weights", type=click.Choice(["each", "rank0"]),
              help="each: every rank reads its own slabs (the model file on every node); "
                   "rank0: only rank 0 opens it and sends each rank its share (run.weights).")
@click.option("--overlap/--no-overlap", default=None,
              help="Overlap the exchange with compute (default) or use blocking Alltoallv.")
@click.option("--save-routing", is_flag=True, default=None, help="Write /routing for `moempi place`.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing output.")
@click.option("--checkpoint", help="Checkpoint folder (run.checkpoint): progress is saved after "
              "each batch (pipeline.batch_tokens) and a restarted job resumes from it.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override any config key, e.g. --set pipeline.batch_tokens=1024 (repeatable).")
def run(config, model, tokens, output, placement, precision, micro_batches, weights, overlap,
        save_routing, overwrite, checkpoint, sets):
    """Run the forward pass as an MPI job:  mpiexec -n P moempi run [CONFIG.toml] [options].

    Settings come from CONFIG (TOML, see input/), then --set, then the named flags. Rank 0
    validates config, placement and model and broadcasts them; each rank reads only the
    expert slabs it hosts (or, with --weights rank0, rank 0 reads them all and sends them);
    with data-parallel replicas their copies are compared before any compute; any rank's
    failure ends the whole job with a message.
    {job} in --output/--checkpoint becomes the Slurm job id (JOB_TASK in an array), or
    "local"; an existing output is never replaced without --overwrite.
    """
    from mpi4py import MPI

    from moempi.io.config import expand_names, load_config, parse_value
    from moempi.runtime import parallel
    from moempi.runtime.runner import run_job

    world = MPI.COMM_WORLD
    signals.install(world)
    try:
        overrides = {}
        for item in sets:
            key, eq, value = item.partition("=")
            if not eq:
                raise MoempiError(f"--set {item}: expected SECTION.KEY=VALUE")
            overrides[key.strip()] = parse_value(value.strip())
        flags = {"run.model": model, "run.tokens": tokens, "run.output": output,
                 "run.placement": placement, "run.precision": precision,
                 "pipeline.micro_batches": micro_batches, "pipeline.overlap": overlap,
                 "run.save_routing": save_routing, "run.overwrite": overwrite,
                 "run.checkpoint": checkpoint, "run.weights": weights}
        overrides.update({k: v for k, v in flags.items() if v is not None})
        cfg = parallel.root_call(world, lambda: expand_names(load_config(config, overrides)))
        run_job(world, cfg, shlex.join(sys.argv))
        # the ranks done first wait, under the signal watcher, until rank 0 has published
        world.Barrier()
        signals.close()
    except BaseException as exc:
        _end_job(world, exc)


def _end_job(world, exc: BaseException) -> None:
    """How an MPI command ends on an exception: never with other ranks left waiting."""
    from moempi.runtime import parallel
    if signals.stopping():
        # a signal ends this process (moempi.runtime.signals): a failure it caused in this thread,
        # e.g. a peer gone from an exchange, is no news
        threading.Event().wait()
    if isinstance(exc, CollectiveError):
        # every rank raised it together: rank 0 says it once, all exit non-zero (the signal
        # relay's receive cancelled first, or UCX reports it at exit: 3 more lines per rank)
        signals.close()
        if world.rank == 0:
            click.echo(f"moempi: error: {exc}", err=True)
        sys.exit(1)
    if isinstance(exc, SystemExit) and not exc.code:
        raise exc
    parallel.fail(world, exc)     # one rank alone: end the whole job now, never hang


# -- around the job -------------------------------------------------------------------------
@cli.command("info")
@click.option("--backend", type=click.Choice(["cupy", "standin"]), default="cupy", show_default=True,
              help="GPU backend whose rank -> device binding to show (standin: the numpy "
                   "stand-in for CuPy).")
def info(backend):
    """Versions, the MPI library, CUDA-aware status, and each rank's GPU.

    Under mpiexec/srun it shows every rank's node, node-local rank and the device it binds
    to (node-local rank mod visible GPUs, honouring CUDA_VISIBLE_DEVICES).
    """
    from mpi4py import MPI

    from moempi.runtime.backend import describe_binding, mpi_cuda_aware
    from moempi.runtime.output import versions
    world = MPI.COMM_WORLD
    bindings = world.gather(describe_binding(world, backend), root=0)
    if world.rank == 0:
        for key, value in versions().items():
            click.echo(f"{key:>10}: {value}")
        thread = ["single", "funneled", "serialized", "multiple"][MPI.Query_thread()]
        click.echo(f"{'world':>10}: {world.size} rank(s), thread level {thread}")
        aware = mpi_cuda_aware()
        click.echo(f"{'cuda-aware':>10}: {'unknown' if aware is None else ('yes' if aware else 'no')}"
                   " (MPIX query of the MPI library)")
        for rank, line in enumerate(bindings):
            click.echo(f"{'rank ' + str(rank):>10}: {line}")


@cli.command("inspect")
@click.argument("output", type=click.Path(exists=True, dir_okay=False))
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False),
              help="Also write PNG figures here: load heatmap, time breakdown, overlap per "
                   "layer (needs matplotlib: pip install 'moempi[plot]').")
def inspect(output, plot_dir):
    """Summarise a run's OUTPUT file: configuration, expert load per layer, timings, overlap."""
    from moempi.reports.inspect import summarise
    summarise(output, click.echo)
    if plot_dir:
        from moempi.reports.plots import write_plots
        for path in write_plots(output, plot_dir):
            click.echo(f"wrote {path}")


@cli.command("bench")
@click.argument("what", type=click.Choice(["all", "expert", "exchange", "overlap", "micro",
                                           "tp", "node", "calibrate", "place", "gpu",
                                           "balance", "job", "floor", "full"]),
                default="all")
@click.option("--backend", type=click.Choice(["cupy", "standin"]), default="cupy",
              show_default=True, help="For `gpu`: the GPU backend (standin: CuPy code on numpy).")
@click.option("--tokens", type=int, default=256, show_default=True, help="Tokens per rank.")
@click.option("--layers", type=int, default=2, show_default=True, help="MoE layers per pass.")
@click.option("--micro-batches", type=int, default=4, show_default=True,
              help="Micro-batches in flight for the overlapped run.")
@click.option("--calibration", type=click.Path(dir_okay=False),
              help="Write the measured figures here (JSON) for `moempi plan --hardware`.")
@click.option("--add", is_flag=True,
              help="For `calibrate`: add this process to the file's earlier calibrations at this "
                   "rank count and keep the median of each figure (else start it afresh).")
@click.option("--quick", is_flag=True, help="Small shapes (seconds), for tests.")
@click.option("--output-file", type=click.Path(exists=True, dir_okay=False),
              help="For `floor`: the finished run's output whose layers' GEMM floor to measure.")
def bench(what, tokens, layers, micro_batches, calibration, add, quick, backend, output_file):
    """Microbenchmarks under MPI, as ratios measured in one run:  mpiexec -n 2 moempi bench.

    \b
    expert     expert MLP FLOP/s in the real code path vs a plain numpy GEMM of the same shapes
    exchange   dispatch+combine vs a raw mpi4py Alltoallv of the same bytes
    overlap    overlapped vs blocking layer time on the real shape (H 7168, F 2048) and on a
               communication-heavy shape (F chosen so compute and exchange take similar time)
    micro      the start-up choice of the micro-batch count vs every fixed count, and one MoE
               layer's time over the plain-GEMM floor, at H 7168 / F 2048 / 256 tokens per
               rank and H 1024 / F 256 / 4096 tokens per rank (2 experts per layer)
    tp         where tensor-parallel partial outputs are summed: the extra partial rows of
               the combine (implemented) vs an Allreduce in the tensor-parallel group
               (run it at 4 ranks: mpiexec -n 4 moempi bench tp)
    node       direct vs node-deduplicated dispatch on nodes of 8 ranks (16 or 32 ranks: 2 x 8,
               4 x 8; small hidden): rows and bytes crossing nodes, and the layer time, on
               skewed and co-activating routing
    calibrate  this machine for `plan --hardware`, in a fresh process: GEMM and weight-read
               rates, Alltoallv latency and bandwidth, the runner's per-token, per-micro-batch,
               dense-layer and first-pass costs, fitted on runs of the real runner (H 768,
               F 512) -> --calibration FILE; `all` writes only the GEMM and Alltoallv figures
    place      the placement benchmark (no MPI needed)
    gpu        expert MLP vs plain BF16 matmul, 61-layer forward on one GPU, overlap % with
               all ranks sharing the GPU (what `make gpu-check` runs)
    balance    MaxVio before/after bias balancing on a skewed gate, and the time it saves
               (run it at 4 ranks: mpiexec -n 4 moempi bench balance)
    job        whole `mpiexec -n 2 moempi run` jobs as a user launches them (wall time from
               outside; run `moempi bench job` WITHOUT mpiexec: it launches its own) against
               the sum of their layers' plain-GEMM floors, at H 7168 / F 2048 and H 1024 /
               F 256, with where the time went, and the automatic micro-batch count's job
               against the same job at fixed counts (models kept in work/bench-job)
    floor      (used by `job`, under mpiexec) the plain-GEMM floor of --output-file's layers
    full       one MoE layer of DeepSeek-V3's real shapes (--preset deepseek-v3-full: gated
               experts, top-8 in 4 of 8 groups, shared expert) at 2 ranks, 16 of its 256
               experts packed 8 per rank (all 256 do not fit this machine), against its
               plain-GEMM floor
    """
    if what == "job":              # no MPI here: it launches its own jobs
        try:
            from moempi.measure.jobbench import bench_job
            bench_job(click.echo, quick=quick)
        except MoempiError as exc:
            raise click.ClickException(str(exc)) from None
        return
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    try:
        if what == "floor":
            import json
            from moempi.measure.jobbench import gemm_floor
            if not output_file:
                raise MoempiError("bench floor: give --output-file OUT.h5")
            figures = gemm_floor(world, output_file)
            if world.rank == 0:
                click.echo(json.dumps(figures))
            return
        _bench(world, what, tokens, layers, micro_batches, calibration, add, quick, backend)
    except BaseException as exc:
        _end_job(world, exc)


def _bench(world, what, tokens, layers, micro_batches, calibration, add, quick, backend):
    from moempi.measure import bench as b
    from moempi.runtime.heap import keep_freed_memory
    keep_freed_memory()              # as `moempi run` does

    def echo(msg):
        if world.rank == 0:
            click.echo(msg)

    if what == "calibrate":          # first thing: its cold pass is this fresh process's
        if not calibration:
            raise MoempiError("bench calibrate: give --calibration FILE to write")
        from moempi.measure.validate import calibrate
        calibrate(world, calibration, echo, add=add)
        return

    if what == "balance":
        b.bench_balance(world, echo, quick)
        return
    if what == "full":
        from moempi.measure.fullbench import bench_full
        b.use_compiled(world, echo)
        bench_full(world, echo, tokens=64 if quick else tokens, quick=quick)
        return
    if what == "node":
        b.bench_node_dispatch(world, echo, gpus_per_node=4 if quick else 8, tokens=tokens // 4)
        return
    if what == "tp":
        b.bench_tp_sum(world, echo, hidden=512 if quick else 7168, tokens=tokens)
        return
    if what == "gpu":
        echo("| measure | figure | against | |\n| --- | --- | --- | --- |")
        b.bench_gpu(world, backend, echo, quick)
        return
    if what in ("place",):
        from moempi.place.bench import run_benchmark
        if world.rank == 0:
            run_benchmark(echo=click.echo, quick=quick)
        return
    hidden, ffn = (512, 256) if quick else (7168, 2048)
    real = b.Shape("real", hidden, ffn, tokens, layers)
    echo(f"moempi bench on {world.size} rank(s), {b.platform.node()}; one BLAS thread per rank "
         "recommended (OPENBLAS_NUM_THREADS=1)")
    b.use_compiled(world, echo)
    if what in ("all", "expert"):
        b.bench_expert(world, real, echo)
    if what in ("all", "exchange"):
        b.bench_exchange(world, real, echo)
        b.bench_exchange(world, real, echo, precision="bf16")
    if what in ("all", "overlap"):
        b.bench_overlap(world, real, echo, micro_batches)
        heavy_ffn = b.comm_heavy_ffn(world, hidden, tokens)
        b.bench_overlap(world, b.Shape("comm-heavy", hidden, heavy_ffn, tokens, layers), echo,
                        micro_batches)
    if what in ("all", "micro"):
        # the targets are those of the full shapes (--quick shrinks the shapes, not them)
        shapes = [b.Shape("real", hidden, ffn, tokens if quick else 256, 1, layer_target=1.03),
                  b.Shape("wide-batch", 1024 // (4 if quick else 1), 256 // (4 if quick else 1),
                          4096 // (4 if quick else 1), 1, layer_target=1.15)]
        for shape in shapes:
            b.bench_micro_batches(world, shape, echo)
    if what == "all":
        b.calibrate(world, echo, calibration)


def _register_optional():
    """Commands that live in their own modules."""
    from moempi.cli.place import place
    from moempi.cli.plan import plan
    cli.add_command(place)
    cli.add_command(plan)


_register_optional()
