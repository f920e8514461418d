"""`moempi inspect`: a run's output summarised for a person (load, timings, overlap)."""

from __future__ import annotations

import json

import numpy as np

from moempi.errors import MoempiError
from moempi.io.hdf5 import open_h5
from moempi.perf.predict import STARTUP_SOURCE

DIFFERS = 0.15              # measured and predicted differ: say which way and what to do
LOW_OVERLAP = 20.0          # % below which inspect points to where overlap does show
CELL_BYTES = 1 << 20        # MPICH shared-memory cell that lets a poll move an exchange
# `make run-overlap` (input/overlap.toml): where overlap hides the exchange on the 2-core VM
OVERLAP_DEMO = ("2 ranks, one core each, equal loads, an exchange a quarter of the compute, "
                "6 micro-batches, MPICH's shared-memory cells at 1 MiB: input/overlap.toml")


def _json_attr(f, name, default=None):
    value = f.attrs.get(name)
    if value is None:
        return default
    return json.loads(value)


def layout_line(f, cfg: dict) -> str:
    """How the world was laid out and the weights loaded, for the summary."""
    ep, dp = int(f.attrs["ep"]), int(f.attrs["dp"])
    groups = "; ".join(f"replica {d}: ranks {d * ep}-{d * ep + ep - 1}" for d in range(dp))
    weights = cfg.get("run", {}).get("weights", "each")
    loaded = "read by rank 0 and sent" if weights == "rank0" else "each rank reading its own"
    line = (f"layout: ep {ep} x dp {dp} ({groups}); weights {loaded} in "
            f"{float(f.attrs.get('weights_seconds', float('nan'))):.2f} s")
    check = _json_attr(f, "replica_check", {})
    if check:
        line += (f"; replicas verified: {check['arrays']} arrays per rank equal across "
                 f"replicas (CRC-32)")
    return line


def summarise(path: str, echo=print) -> None:
    """Print the run's configuration, per-layer expert load, timing breakdown, the time
    model's prediction beside the measurement, and the overlap with why it is what it is."""
    with open_h5(path, "output") as f:
        if f.attrs.get("format") != "moempi-output":
            raise MoempiError(f"{path}: not a moempi output file")
        cfg = _json_attr(f, "config", {})
        meta = _json_attr(f, "model_meta", {})
        echo(f"{path}: {f['hidden'].shape[0]} tokens x {f['hidden'].shape[1]}, "
             f"{f.attrs['world_size']} ranks (ep={f.attrs['ep']}, dp={f.attrs['dp']}), "
             f"{meta.get('num_layers')} layers, {meta.get('num_experts')} experts, "
             f"precision {cfg.get('run', {}).get('precision')}, "
             f"{int(f.attrs['micro_batches'])} micro-batch(es), "
             f"{'overlapped' if cfg.get('pipeline', {}).get('overlap') else 'blocking'}")
        echo(layout_line(f, cfg))
        echo(f"command: {f.attrs['command_line']}")
        forward = float(f.attrs["forward_seconds"])
        echo(f"forward: {forward:.3f} s ({f['hidden'].shape[0] / forward:,.0f} tokens/s)")
        echo(prediction_line(f, forward))
        if "stats/peak_host_bytes" in f:
            peak = f["stats/peak_host_bytes"][:] / 2**20
            echo(f"peak host memory per rank: max {peak.max():,.0f} MiB, "
                 f"min {peak.min():,.0f} MiB")
        moe = f["stats/moe_layers"][:]
        tpr = f["stats/tokens_per_rank"][:].astype(float)         # [L_moe, P]
        imb_r = tpr.max(1) / np.maximum(tpr.mean(1), 1e-12)
        timings = {k: f[f"timings/{k}"][:] for k in ("compute", "wait", "overall",
                                                     "dispatch", "combine", "pure_comm", "overlap")}
        predicted = f["timings/predicted"][:] if "timings/predicted" in f else None   # [L] s
        echo("")
        for line in layer_table(f, meta, timings, predicted):
            echo(line)
        tot = {k: v.sum(axis=1) for k, v in timings.items() if k != "overlap"}
        echo("per-rank totals (s, mean over ranks, max): " + ", ".join(
            f"{k} {tot[k].mean():.3f} (max {tot[k].max():.3f})"
            for k in ("overall", "compute", "wait", "pure_comm")))
        moe_cols = timings["overlap"][:, moe]
        mean_overlap = None
        if np.isfinite(moe_cols).any():
            over = tot["overall"] - tot["compute"]
            total_pct = np.where(tot["pure_comm"] > 0, np.maximum(
                0, 100 * (1 - over / np.maximum(tot["pure_comm"], 1e-12))), np.nan)
            mean_overlap = float(np.nanmean(moe_cols))
            echo(f"overlap (OSU definition, whole run): mean {np.nanmean(total_pct):.1f} %, "
                 f"per layer mean {mean_overlap:.1f} %")
        for line in overlap_reasons(f, cfg, meta, timings, moe, imb_r):
            echo(line)
        if len(moe):                 # the rest of why (overlap_reasons says "why ...:")
            for line in mpich_cells(f, cfg, mean_overlap) + prediction_reasons(
                    f, cfg, forward, mean_overlap):
                echo(line)


def _ms(seconds: float, width: int) -> str:
    return f"{seconds * 1e3:>{width}.2f}"


def layer_table(f, meta: dict, timings: dict, predicted) -> list[str]:
    """Per layer: the expert load (MoE layers), the measured times beside the predicted one
    (``predicted`` `[L]` s, or None), the exchange alone and the overlap; no NaN shown."""
    moe = f["stats/moe_layers"][:]
    tpe = f["stats/tokens_per_expert"][:].astype(float)       # [L_moe, E]
    tpr = f["stats/tokens_per_rank"][:].astype(float)         # [L_moe, P]
    imb_e = tpe.max(1) / np.maximum(tpe.mean(1), 1e-12)
    imb_r = tpr.max(1) / np.maximum(tpr.mean(1), 1e-12)
    lines = ["per layer: expert load (MoE layers), time measured and predicted",
             f"{'layer':>5} {'kind':>5} {'min/expert':>10} {'max/expert':>10} {'imb(exp)':>9} "
             f"{'imb(rank)':>9} {'compute ms':>10} {'wait ms':>8} {'overall ms':>10} "
             f"{'predicted ms':>12} {'error':>6} {'pure comm ms':>12} {'overlap%':>8}",
             "  min/max/expert: (token, expert) pairs over all ranks; imb: max / mean over "
             "experts, ranks; compute, wait, overall, pure comm: ms, max over ranks; predicted: "
             "the time model's (the 'predicted:' line above), error: predicted / overall - 1; "
             "overlap%: mean over "
             "ranks (OSU); n/a: a dense layer exchanges nothing; -: not measured or predicted"]
    index = {int(l): i for i, l in enumerate(moe)}
    dense = [l for l in range(int(meta.get("num_layers", 0))) if l not in index]
    shown = sorted(set(dense) | {int(moe[i]) for i in (
        range(len(moe)) if len(moe) <= 24 else np.linspace(0, len(moe) - 1, 12).astype(int))})
    for l in shown:
        column = timings["overlap"][:, l]
        ov = np.nanmean(column) if np.isfinite(column).any() else float("nan")
        if l in index:
            i = index[l]
            load = (f"{'moe':>5} {tpe[i].min():>10.0f} {tpe[i].max():>10.0f} "
                    f"{imb_e[i]:>9.2f} {imb_r[i]:>9.2f}")
        else:
            load = f"{'dense':>5} {'-':>10} {'-':>10} {'-':>9} {'-':>9}"
        shown_ov = f"{ov:>8.1f}" if np.isfinite(ov) else \
            f"{'n/a':>8}" if l not in index else f"{'-':>8}"
        overall = timings["overall"][:, l].max()
        pred, err = f"{'-':>12}", f"{'-':>6}"
        if predicted is not None and np.isfinite(predicted[l]):
            pred = _ms(predicted[l], 12)
            if overall > 0:
                err = f"{round(100 * (predicted[l] / overall - 1)) or 0:>+5d}%"
        lines.append(f"{l:>5} {load} {_ms(timings['compute'][:, l].max(), 10)} "
                     f"{_ms(timings['wait'][:, l].max(), 8)} {_ms(overall, 10)} {pred} {err} "
                     f"{_ms(timings['pure_comm'][:, l].max(), 12)} {shown_ov}")
    if len(shown) < len(dense) + len(moe):
        lines.append(f"  ({len(shown) - len(dense)} of {len(moe)} MoE layers shown)")
    lines += ["", f"imbalance over MoE layers: experts mean {imb_e.mean():.2f} max "
                  f"{imb_e.max():.2f}; ranks mean {imb_r.mean():.2f} max {imb_r.max():.2f}; "
                  f"MaxVio mean {(imb_e - 1).mean():.3f}"]
    return lines


def prediction_line(f, forward: float) -> str:
    """The run's forward as the time model predicted it, and from which figures."""
    if "prediction_error" in f.attrs:
        return (f"predicted: none: the model could not predict this run "
                f"({f.attrs['prediction_error']})")
    if "predicted_forward_seconds" not in f.attrs:
        return "predicted: no prediction recorded (an output of a moempi before predictions)"
    pred = float(f.attrs["predicted_forward_seconds"])
    source = str(f.attrs["prediction_source"])
    what = ("; the CPU work beside the GEMMs (norm, gate, packing, the scheduler) is not in it"
            if source == STARTUP_SOURCE else "")
    return (f"predicted: {pred:.3f} s ({_relative(pred, forward)} the measured), from "
            f"{source}{_calibrated_ranks(f)}{what}")


def _calibrated_ranks(f) -> str:
    """", calibrated at 4 ranks, not this run's 2" when the calibration lacks the run's
    rank count (its figures are then inter- or extrapolated); "" otherwise."""
    ranks = _json_attr(f, "prediction_calibration_ranks", [])
    job = _json_attr(f, "prediction_job", {})
    if not ranks or job.get("ranks") in ranks:
        return ""
    return (f", calibrated at {', '.join(map(str, ranks))} ranks, not this run's "
            f"{job.get('ranks')}")


def _relative(a: float, b: float) -> str:
    """``a`` against ``b`` in words: "12 % more than", "30 % less than", "17.3 x"."""
    ratio = a / max(b, 1e-12)
    if ratio >= 2:
        return f"{ratio:.1f} x"
    return f"{abs(ratio - 1):.0%} {'more' if ratio >= 1 else 'less'} than"


def overlap_reasons(f, cfg: dict, meta: dict, timings: dict, moe, imb_r) -> list[str]:
    """Why the overlap % is what it is, in words a user acts on: the run's micro-batch
    count, the exchange's size against the compute, ranks sharing cores, imbalance."""
    if not len(moe):
        return []
    lines = ["why the overlap is what it is:"]
    micro = int(f.attrs["micro_batches"])
    overlap_on = cfg.get("pipeline", {}).get("overlap", True)
    shared = int(meta.get("shared_ffn_size", 0) or 0)
    compute = timings["compute"][:, moe].sum(axis=1).mean()
    pure = timings["pure_comm"][:, moe].sum(axis=1).mean()
    wait = timings["wait"][:, moe].sum(axis=1).mean()
    if not overlap_on:
        lines.append("- the exchanges were blocking (pipeline.overlap = false): nothing overlaps "
                     "by design; run with --overlap to hide them behind compute")
    elif micro == 1:
        hides = (" apart from the shared expert, which each rank computes for its own tokens "
                 "while its dispatch is in flight" if shared else "")
        lines.append(f"- one micro-batch: its experts need the rows its dispatch brings and its "
                     f"weighted sum the rows the combine returns, so nothing computes while its "
                     f"own exchanges fly{hides}; with --micro-batches 2 or more one micro-batch "
                     f"computes while another's exchange is in flight (the automatic count "
                     f"chose 1 as the fastest, or had no room to try others)")
    if pure > 0:
        lines.append(f"- the exchanges alone take {pure:.3f} s against {compute:.3f} s of "
                     f"compute in the MoE layers ({pure / max(compute, 1e-12):.0%}); the "
                     f"ranks waited {wait:.3f} s: overlap can save at most the exchange's "
                     f"time, {pure / max(compute + pure, 1e-12):.0%} of the layers'")
    else:
        lines.append("- the exchanges were not replayed alone (pipeline.measure_pure_comm = "
                     "false, or no layer fit the replay's budget): the overlap % is not "
                     "measured; pipeline.pure_comm_layers = \"all\" replays every layer")
    node = _json_attr(f, "node", {})
    if node and node.get("ranks", 0) > node.get("cores", 1 << 30):
        lines.append(f"- {node['ranks']} ranks shared {node['cores']} cores on a node: MPI's "
                     f"copies and the other ranks' compute run on the same cores, so the "
                     f"time waiting is mostly other ranks' work, not the network; give each "
                     f"rank its own core (or GPU) to see the overlap")
    worst = float(np.max(imb_r)) if len(imb_r) else 1.0
    if worst > 1.2:
        lines.append(f"- the ranks' expert loads differ (the busiest up to {worst:.2f} x the "
                     f"mean rows): the others wait for it, and that waiting counts against "
                     f"the overlap; balance.enabled = true or `moempi place` even it out")
    return lines


def mpich_cells(f, cfg: dict, mean_overlap: float | None) -> list[str]:
    """MPICH on one node moves one shared-memory cell per progress call (8 KiB by default):
    the polls between expert GEMM chunks then barely move an exchange of megabytes, which
    moves while the ranks wait instead.  Said when the overlap was low with exchanges that
    could overlap, on one node, and the run recorded its MPICH settings (``mpi_env``)."""
    env = _json_attr(f, "mpi_env")
    node = _json_attr(f, "node", {})
    mpi = _json_attr(f, "versions", {}).get("mpi", "")
    overlapping = cfg.get("pipeline", {}).get("overlap", True) and (
        int(f.attrs["micro_batches"]) > 1 or _json_attr(f, "model_meta", {}).get("shared_ffn_size"))
    if (env is None or "MPICH" not in mpi or not overlapping or node.get("ranks", 0)
            != int(f.attrs["world_size"]) or (mean_overlap or 0.0) >= LOW_OVERLAP):
        return []
    cell = int(env.get("MPIR_CVAR_CH4_SHM_POSIX_IQUEUE_CELL_SIZE", 8192))
    if cell >= CELL_BYTES:
        return []
    return [f"- MPICH moves one shared-memory cell per progress call, {cell // 1024} KiB "
            f"here: the polls between expert GEMM chunks move little of each exchange, "
            f"which moves while the ranks wait instead; with "
            f"MPIR_CVAR_CH4_SHM_POSIX_IQUEUE_CELL_SIZE={CELL_BYTES} "
            f"MPIR_CVAR_CH4_PACK_BUFFER_SIZE={2 * CELL_BYTES} in the job's environment each "
            f"poll moves 1 MiB (64 MiB of shared memory per rank)"]


def prediction_reasons(f, cfg: dict, forward: float, mean_overlap: float | None) -> list[str]:
    """More of why: the measured forward against the predicted one when they differ by more
    than :data:`DIFFERS` (which way, and what to do), and where overlap does show when this
    run's is low."""
    lines = []
    ranks = int(f.attrs["world_size"])
    calibration = cfg.get("run", {}).get("calibration", "") or "calibration.json"
    command = f"`mpiexec -n {ranks} moempi bench calibrate --calibration {calibration}`"
    if "predicted_forward_seconds" in f.attrs:
        pred = float(f.attrs["predicted_forward_seconds"])
        err = pred / max(forward, 1e-12) - 1
        probes = str(f.attrs["prediction_source"]) == STARTUP_SOURCE
        took = f"- the forward took {forward:.3f} s, {_relative(forward, pred)} the {pred:.3f} s"
        if err < -DIFFERS and probes:
            lines.append(f"{took} predicted from this run's "
                         f"start-up probes, which count only the GEMMs and the wire: the rest "
                         f"is the CPU work beside them and waiting; to predict it too, "
                         f"calibrate this machine once at this rank count, {command}, and run "
                         f"with --set run.calibration={calibration}")
        elif err < -DIFFERS:
            lines.append(f"{took} predicted from its calibration{_calibrated_ranks(f)}: "
                         f"the machine was slower than when calibrated (another "
                         f"job on it, more ranks than cores) or the calibration is of another "
                         f"machine or rank count; on a quiet machine, recalibrate: {command} "
                         f"(if it stays, the model misses something of this configuration)")
        elif err > DIFFERS:
            lines.append(f"{took} predicted from {f.attrs['prediction_source']}: the figures "
                         f"are slower than what this run saw (measured while the machine was "
                         f"busy, or at another rank count); on a quiet machine, recalibrate: "
                         f"{command} (if it stays, the model misses something of this "
                         f"configuration)")
    if mean_overlap is None or mean_overlap < LOW_OVERLAP:
        lines.append(f"- where overlap does hide the exchange on a 2-core machine: "
                     f"`make run-overlap` in the moempi repository ({OVERLAP_DEMO})")
    return lines
