"""`moempi inspect --plot DIR`: a run's output drawn as PNG figures (matplotlib, optional)."""

from __future__ import annotations

import os
import warnings

import numpy as np

from moempi.errors import MoempiError
from moempi.io.hdf5 import open_h5

FIGURES = ("load.png", "time.png", "overlap.png")


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise MoempiError("--plot needs matplotlib: pip install 'moempi[plot]'") from None
    matplotlib.use("Agg")              # files only, never a window
    from matplotlib.figure import Figure
    return Figure


def _read(path: str) -> dict:
    with open_h5(path, "output") as f:
        try:
            data = {"moe": f["stats/moe_layers"][:].astype(int),                  # [L_moe]
                    "tpe": f["stats/tokens_per_expert"][:].astype(float),         # [L_moe, E]
                    "world": int(f.attrs.get("world_size", 0))}
            for name in ("compute", "wait", "overall", "overlap"):
                data[name] = f[f"timings/{name}"][:].astype(float)                # [P, L]
        except KeyError as exc:
            raise MoempiError(f"{path}: not a moempi output file (missing {exc})") from None
    return data


def _width(n: int) -> float:
    return float(min(24, max(6, 2.5 + 0.22 * n)))


def _load_figure(Figure, d, name):
    """Heatmap of tokens per expert / layer mean, MoE layers down, experts across."""
    tpe, moe = d["tpe"], d["moe"]
    mean = np.maximum(tpe.mean(axis=1, keepdims=True), 1e-12)
    ratio = tpe / mean                                                             # [L_moe, E]
    imb = ratio.max(axis=1)
    fig = Figure(figsize=(_width(tpe.shape[1]) + 1.5, max(3.5, 1.5 + 0.16 * len(moe))))
    ax = fig.add_subplot(1, 1, 1)
    vmax = max(2.0, float(np.ceil(ratio.max() * 2) / 2))
    im = ax.imshow(ratio, aspect="auto", cmap="RdBu_r", vmin=0, vmax=vmax,
                   interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    step = max(1, len(moe) // 20)
    ax.set_yticks(range(0, len(moe), step), [str(l) for l in moe[::step]])
    fig.colorbar(im, ax=ax, label="tokens / layer mean (1 = balanced)")
    worst = int(np.argmax(imb))
    ax.set_title(f"{name}: expert load, max/mean {imb.mean():.2f} on average, "
                 f"worst {imb[worst]:.2f} (layer {moe[worst]})", fontsize=10)
    return fig


def _time_figure(Figure, d, name):
    """Per-layer time split (mean over ranks): compute, exchange not hidden, waiting."""
    compute, wait, overall = d["compute"], d["wait"], d["overall"]                 # [P, L]
    exchange = np.maximum(overall - compute - wait, 0.0)
    parts = {"compute": compute.mean(0), "exchange (not hidden)": exchange.mean(0),
             "waiting": wait.mean(0)}
    layers = np.arange(compute.shape[1])
    fig = Figure(figsize=(_width(len(layers)), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    bottom = np.zeros(len(layers))
    for (label, values), color in zip(parts.items(), ("#4c72b0", "#dd8452", "#c44e52")):
        ax.bar(layers, values * 1e3, bottom=bottom * 1e3, label=label, color=color, width=0.8)
        bottom += values
    ax.plot(layers, overall.max(0) * 1e3, "k.", label="slowest rank (total)")
    ax.set_xlabel("layer")
    ax.set_ylabel("time per layer (ms)")
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.legend(fontsize=8, loc="upper right")
    total = {k: v.sum() for k, v in parts.items()}
    ax.set_title(f"{name}: {d['world']} ranks, per rank " + ", ".join(
        f"{k.split()[0]} {v:.3f} s" for k, v in total.items()), fontsize=10)
    return fig


def _overlap_figure(Figure, d, name):
    """Overlap % per MoE layer: mean over ranks with the min-max range."""
    moe = d["moe"]
    ov = d["overlap"][:, moe]                                                      # [P, L_moe]
    fig = Figure(figsize=(_width(len(moe)), 4))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("communication hidden behind compute (%)")
    ax.set_ylim(0, 105)
    finite = np.isfinite(ov)
    if finite.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)       # an all-NaN layer stays NaN
            mean, lo, hi = np.nanmean(ov, 0), np.nanmin(ov, 0), np.nanmax(ov, 0)
        x = np.arange(len(moe))
        ax.fill_between(x, lo, hi, color="#4c72b0", alpha=0.25, label="range over ranks")
        ax.plot(x, mean, "o-", color="#4c72b0", label="mean over ranks")
        step = max(1, len(moe) // 20)
        ax.set_xticks(x[::step], [str(l) for l in moe[::step]])
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title(f"{name}: overlap (OSU definition), mean {np.nanmean(ov):.1f} %",
                     fontsize=10)
    else:
        ax.text(0.5, 0.5, "no exchange measured (one rank, or pure-communication replay off)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{name}: overlap", fontsize=10)
    return fig


def write_plots(output_path: str, folder: str) -> list[str]:
    """Write load.png, time.png and overlap.png for a run's output into ``folder``; their paths."""
    Figure = _matplotlib()
    data = _read(output_path)
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(output_path)
    paths = []
    for filename, draw in zip(FIGURES, (_load_figure, _time_figure, _overlap_figure)):
        fig = draw(Figure, data, name)
        fig.tight_layout()
        path = os.path.join(folder, filename)
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths
