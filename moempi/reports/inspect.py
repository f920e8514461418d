"""`moempi inspect`: a run's output summarised for a person (load, timings, overlap)."""

from __future__ import annotations

import json

import numpy as np

from moempi.errors import MoempiError
from moempi.io.hdf5 import open_h5


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
    """Print the run's configuration, per-layer expert load, timing breakdown and overlap."""
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
        echo(f"forward: {f.attrs['forward_seconds']:.3f} s "
             f"({f['hidden'].shape[0] / f.attrs['forward_seconds']:,.0f} tokens/s)")
        if "stats/peak_host_bytes" in f:
            peak = f["stats/peak_host_bytes"][:] / 2**20
            echo(f"peak host memory per rank: max {peak.max():,.0f} MiB, "
                 f"min {peak.min():,.0f} MiB")
        moe = f["stats/moe_layers"][:]
        tpe = f["stats/tokens_per_expert"][:].astype(float)       # [L_moe, E]
        tpr = f["stats/tokens_per_rank"][:].astype(float)         # [L_moe, P]
        imb_e = tpe.max(1) / np.maximum(tpe.mean(1), 1e-12)
        imb_r = tpr.max(1) / np.maximum(tpr.mean(1), 1e-12)
        timings = {k: f[f"timings/{k}"][:] for k in ("compute", "wait", "overall",
                                                     "dispatch", "combine", "pure_comm", "overlap")}
        echo("")
        echo("per layer: expert load (MoE layers) and time")
        echo(f"{'layer':>5} {'kind':>5} {'min/expert':>10} {'max/expert':>10} {'imb(exp)':>9} "
             f"{'imb(rank)':>9} {'compute s':>9} {'wait s':>8} {'overall s':>9} "
             f"{'pure comm':>9} {'overlap%':>8}")
        echo("  min/max/expert: (token, expert) pairs over all ranks; imb: max / mean over "
             "experts, ranks; compute, wait, overall, pure comm: seconds, max over ranks; "
             "overlap%: mean over ranks (OSU); n/a: a dense layer exchanges nothing; -: not "
             "measured")
        index = {int(l): i for i, l in enumerate(moe)}
        dense = [l for l in range(int(meta.get("num_layers", 0))) if l not in index]
        shown = sorted(set(dense) | {int(moe[i]) for i in (
            range(len(moe)) if len(moe) <= 24 else np.linspace(0, len(moe) - 1, 12).astype(int))})
        for l in shown:
            ov = np.nanmean(timings["overlap"][:, l]) if np.isfinite(
                timings["overlap"][:, l]).any() else float("nan")
            if l in index:
                i = index[l]
                load = (f"{'moe':>5} {tpe[i].min():>10.0f} {tpe[i].max():>10.0f} "
                        f"{imb_e[i]:>9.2f} {imb_r[i]:>9.2f}")
            else:
                load = f"{'dense':>5} {'-':>10} {'-':>10} {'-':>9} {'-':>9}"
            shown_ov = f"{ov:>8.1f}" if np.isfinite(ov) else \
                f"{'n/a':>8}" if l not in index else f"{'-':>8}"
            echo(f"{l:>5} {load} {timings['compute'][:, l].max():>9.4f} "
                 f"{timings['wait'][:, l].max():>8.4f} {timings['overall'][:, l].max():>9.4f} "
                 f"{timings['pure_comm'][:, l].max():>9.4f} {shown_ov}")
        if len(shown) < len(dense) + len(moe):
            echo(f"  ({len(shown) - len(dense)} of {len(moe)} MoE layers shown)")
        echo("")
        echo(f"imbalance over MoE layers: experts mean {imb_e.mean():.2f} max {imb_e.max():.2f};"
             f" ranks mean {imb_r.mean():.2f} max {imb_r.max():.2f}; MaxVio mean "
             f"{(imb_e - 1).mean():.3f}")
        tot = {k: v.sum(axis=1) for k, v in timings.items() if k != "overlap"}
        echo("per-rank totals (s, mean over ranks, max): " + ", ".join(
            f"{k} {tot[k].mean():.3f} (max {tot[k].max():.3f})"
            for k in ("overall", "compute", "wait", "pure_comm")))
        moe_cols = timings["overlap"][:, moe]
        if np.isfinite(moe_cols).any():
            over = tot["overall"] - tot["compute"]
            total_pct = np.where(tot["pure_comm"] > 0, np.maximum(
                0, 100 * (1 - over / np.maximum(tot["pure_comm"], 1e-12))), np.nan)
            echo(f"overlap (OSU definition, whole run): mean {np.nanmean(total_pct):.1f} %, "
                 f"per layer mean {np.nanmean(moe_cols):.1f} %")
        for line in overlap_reasons(f, cfg, meta, timings, moe, imb_r):
            echo(line)


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
