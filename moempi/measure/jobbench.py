"""The user's figure: whole `mpiexec moempi run` jobs against the sum of their layers' plain-GEMM floors.

A microbenchmark of one layer cannot see what a job pays around its layers: launching the
processes and importing, reading the weights, choosing the micro-batch count, loading the
compiled local steps, replaying exchanges for the overlap %, writing the output.  Here each
job is launched as a user launches it (``mpiexec -n P moempi run``, wall time from outside),
its output's ``phase_seconds`` say where the time went, and ``moempi bench floor`` (under
MPI, every rank at once, as in the job) measures the plain numpy GEMM time of the job's own
rows, layer by layer.  The automatic micro-batch count's whole job is compared with the same
job at fixed counts passed by hand.

The driver runs without MPI (``moempi bench job``, not under ``mpiexec``): it launches its
own jobs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from moempi.errors import MoempiError
from moempi.io import hdf5
from moempi.model.shapes import ModelMeta

AUTO_TARGET = 1.03           # the automatic count's whole job over the best fixed count's
TUNING_TARGET = 0.02         # the tuning's cost over the forward
REPLAY_TARGET = 0.02         # the overlap %'s replay of exchanges over the forward


@dataclass(frozen=True)
class JobShape:
    name: str
    hidden: int
    ffn: int
    tokens: int              # tokens per rank
    layers: int              # all layers; the first is dense (Fd = F)


SHAPES = (JobShape("real", 7168, 2048, 512, 8), JobShape("wide-batch", 1024, 256, 4096, 8))
QUICK = (JobShape("quick", 256, 128, 256, 4),)


def mpiexec() -> str:
    """The launcher: ``$MPIEXEC``, else the one beside this Python (the venv's), else PATH's."""
    beside = Path(sys.executable).parent / "mpiexec"
    found = os.environ.get("MPIEXEC") or (str(beside) if beside.exists() else
                                          shutil.which("mpiexec"))
    if not found:
        raise MoempiError("bench job: no mpiexec found (set MPIEXEC)")
    return found


def _launch(ranks: int, *args, timeout: float = 600) -> tuple[float, str]:
    """``mpiexec -n ranks moempi ARGS``: (wall seconds seen from outside, stdout)."""
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "moempi", *map(str, args)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise MoempiError(f"bench job: {' '.join(cmd)} failed ({proc.returncode}): "
                          f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
    return wall, proc.stdout


def _inputs(folder: Path, shape: JobShape, ranks: int, echo) -> tuple[Path, Path]:
    """The shape's model (bfloat16, one dense layer, ``ranks`` experts, top-2) and tokens,
    written once and kept in ``folder`` for later runs."""
    tag = f"{shape.hidden}x{shape.ffn}-l{shape.layers}-e{ranks}"
    model, tokens = folder / f"model-{tag}.h5", folder / f"tokens-{tag}-{shape.tokens}.h5"
    if not model.exists():
        echo(f"  writing {model} (once)")
        meta = ModelMeta(hidden_size=shape.hidden, moe_ffn_size=shape.ffn,
                         dense_ffn_size=shape.ffn, num_layers=shape.layers, num_dense_layers=1,
                         num_experts=max(ranks, 2), top_k=2)
        hdf5.write_model(str(model), meta)
    if not tokens.exists():
        hdf5.write_tokens(str(tokens), shape.tokens * ranks, shape.hidden)
    return model, tokens


def _summary(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        a = f.attrs
        return {"phases": json.loads(a["phase_seconds"]), "tuning": json.loads(a["tuning"]),
                "micro_batches": int(a["micro_batches"]), "forward": float(a["forward_seconds"]),
                "replayed": json.loads(a["pure_comm_replayed"]),
                "total": float(a["total_seconds"])}


def bench_job(echo, ranks: int = 2, quick: bool = False, repeats: int = 2,
              fixed=(1, 2, 4), folder: str = "work/bench-job") -> list[dict]:
    """Each shape's job: the automatic count and each ``fixed`` count, ``repeats`` times in
    alternation (best of), against the sum of its layers' GEMM floors.  ``quick``: one
    small shape, once, fixed counts 1 and 2 (for tests)."""
    launched = int(os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or 1)
    if launched > 1:           # every rank would launch the same jobs on the same cores
        raise MoempiError(f"bench job launches its own {ranks}-rank jobs: run it without "
                          f"mpiexec (this is one of {launched} ranks)")
    if quick:
        repeats, fixed = 1, (1, 2)
    where = Path(folder)
    where.mkdir(parents=True, exist_ok=True)
    results = []
    for shape in QUICK if quick else SHAPES:
        model, tokens = _inputs(where, shape, ranks, echo)
        runs = {"auto": 0, **{str(m): m for m in fixed}}
        walls = {label: [] for label in runs}
        kept = {}
        # untimed first: the page cache then holds the model for every timed job alike
        _launch(ranks, "run", "--model", model, "--tokens", tokens, "--output",
                where / f"out-{shape.name}-warm.h5", "--overwrite", "--micro-batches", 1)
        for r in range(repeats):
            order = list(runs.items())
            for label, count in order[r % len(order):] + order[:r % len(order)]:  # rotated
                out = where / f"out-{shape.name}-{label}.h5"
                wall, _ = _launch(ranks, "run", "--model", model, "--tokens", tokens,
                                  "--output", out, "--overwrite", "--micro-batches", count)
                walls[label].append(wall)
                if wall <= min(walls[label]):
                    kept[label] = _summary(out)
        _, text = _launch(ranks, "bench", "floor", "--output-file",
                          where / f"out-{shape.name}-auto.h5")
        floor = json.loads(text.strip().splitlines()[-1])
        results.append(_report(echo, shape, ranks, walls, kept, floor))
    return results


def _report(echo, shape: JobShape, ranks: int, walls: dict, kept: dict, floor: dict) -> dict:
    best = {label: min(ts) for label, ts in walls.items()}
    auto = kept["auto"]
    ph, tuning = auto["phases"], auto["tuning"]
    wall = best["auto"]
    kernels = (tuning.get("local_kernels") or {})
    fixed = {k: v for k, v in best.items() if k != "auto"}
    best_fixed = min(fixed, key=fixed.get)
    result = {"shape": shape.name, "wall_s": wall, "floor_s": floor["total_s"],
              "job_vs_floor": wall / floor["total_s"], "phases_s": ph,
              "auto_count": auto["micro_batches"], "fixed_s": fixed,
              "auto_vs_best": wall / fixed[best_fixed],
              "tuning_share": tuning["cost_share_of_forward"],
              "replay_share": ph["replay"] / max(ph["forward"], 1e-9),
              "local_kernels": kernels.get("mode", "numpy")}
    echo(f"job ({shape.name}, H={shape.hidden} F={shape.ffn}, {shape.layers} layers (1 dense), "
         f"{shape.tokens} tokens/rank, {ranks} ranks, fp32): the whole `mpiexec moempi run` "
         f"{wall:.2f} s (best of {len(walls['auto'])}) over the sum of its layers' plain-GEMM "
         f"floors {floor['total_s']:.3f} s (MoE {floor['moe_s']:.3f}, dense "
         f"{floor['dense_s']:.3f}) -> {result['job_vs_floor']:.2f}")
    outside = wall - auto["total"]
    echo(f"  where it went: launch, imports, output and exit {outside:.2f} s; start-up "
         f"{ph['start_up']:.2f} s (weights {ph['weights']:.2f} s, local steps "
         f"{kernels.get('mode', 'numpy')} {kernels.get('load_seconds', 0.0):.2f} s); tuning "
         f"{ph['tuning'] * 1e3:.1f} ms ({result['tuning_share']:.1%} of the forward); forward "
         f"{ph['forward']:.2f} s ({ph['forward'] / floor['total_s']:.2f} x the floors); replay "
         f"{ph['replay']:.2f} s")
    echo(f"  automatic count {auto['micro_batches']} (job {wall:.2f} s) vs fixed counts by hand: "
         + ", ".join(f"{k}: {v:.2f} s" for k, v in fixed.items())
         + f" -> auto/best {result['auto_vs_best']:.3f}")
    spread = max(walls[best_fixed]) / fixed[best_fixed] - 1
    echo(f"  target auto/best <= {AUTO_TARGET}: " + (
        "met" if round(result["auto_vs_best"], 3) <= AUTO_TARGET else
        f"not met: the best fixed count's own {len(walls[best_fixed])} jobs spread by "
        f"{spread:.1%}; the automatic count's were {', '.join(f'{t:.2f}' for t in walls['auto'])} s"))
    echo(f"  target tuning <= {TUNING_TARGET:.0%} of the forward: " + (
        "met" if result["tuning_share"] <= TUNING_TARGET else
        f"not met: {tuning['micro_batches']}"))
    share = round(result["replay_share"], 3)
    echo(f"  target replay for the overlap % <= {REPLAY_TARGET:.0%} of the forward: " + (
        f"met ({share:.1%}, {len(auto['replayed'])} of {shape.layers - 1} MoE layers "
        f"replayed)" if share <= REPLAY_TARGET else
        f"not met: {share:.1%}: the sample's replays ran over their forecast (the first from "
        f"the layer's exchange time in the run, the others at the seconds per row measured)"))
    return result


def gemm_floor(comm, output: str, repeats: int = 3) -> dict:
    """The plain numpy GEMM time of a finished job's own rows (``bench floor``): per MoE
    layer the slowest rank's expert rows (``/stats/tokens_per_rank``) at the plain GEMM rate
    of that many rows, per dense layer its tokens per rank through ``[H, Fd]`` and back;
    every rank timing at once, as in the job.  Summed over the layers (seconds)."""
    from mpi4py import MPI

    from moempi.measure.bench import plain_gemm_flops
    with h5py.File(output, "r") as f:
        meta = json.loads(f.attrs["model_meta"])
        rows = f["stats/tokens_per_rank"][()]          # [Lm, P]
        tokens = f["hidden"].shape[0]
    world = int(rows.shape[1])
    if world != comm.size:
        raise MoempiError(f"bench floor: the job ran on {world} ranks, this is {comm.size}")
    H, F, Fd = meta["hidden_size"], meta["moe_ffn_size"], meta["dense_ffn_size"]
    mine = rows[:, comm.rank]                             # this rank's expert rows per layer
    comm.Barrier()
    rate = plain_gemm_flops(H, F, max(1, int(np.median(mine))), repeats)
    moe = np.empty(len(mine))                             # [Lm], the slowest rank's
    comm.Allreduce(4.0 * mine.astype(np.float64) * H * F / rate, moe, op=MPI.MAX)
    local = -(-tokens // comm.size)
    comm.Barrier()
    dense = 0.0
    if meta["num_dense_layers"]:
        dense_rate = plain_gemm_flops(H, Fd, local, repeats)
        dense = comm.allreduce(4.0 * local * H * Fd / dense_rate, op=MPI.MAX) * \
            meta["num_dense_layers"]
    return {"moe_s": float(np.sum(moe)), "dense_s": float(dense),
            "total_s": float(np.sum(moe) + dense), "moe_layers_s": [float(t) for t in moe]}
