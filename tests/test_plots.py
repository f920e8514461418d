"""`moempi.reports.plots.write_plots`: three PNG figures from a run's output (matplotlib optional)."""

from __future__ import annotations

import struct
import sys

import h5py
import numpy as np
import pytest

from conftest import mpirun
from moempi.errors import MoempiError
from moempi.reports.plots import FIGURES, write_plots


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG header; fails on anything that is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", head[16:24])


def fake_output(path, layers=61, dense=3, experts=8, ranks=4, overlap=True):
    """An output file with the layout `moempi run` writes (only what the plots read)."""
    rng = np.random.default_rng(0)
    moe = np.arange(dense, layers, dtype=np.int32)
    with h5py.File(path, "w") as f:
        f.attrs["world_size"] = ranks
        f["stats/moe_layers"] = moe
        f["stats/tokens_per_expert"] = rng.integers(50, 400, (len(moe), experts))
        compute = rng.uniform(1e-3, 2e-3, (ranks, layers))
        wait = rng.uniform(0, 5e-4, (ranks, layers))
        f["timings/compute"] = compute
        f["timings/wait"] = wait
        f["timings/overall"] = compute + wait + rng.uniform(0, 1e-3, (ranks, layers))
        ov = np.full((ranks, layers), np.nan)
        if overlap:
            ov[:, moe] = rng.uniform(20, 95, (ranks, len(moe)))
        f["timings/overlap"] = ov
    return path


def check_figures(paths, folder):
    assert [p.rsplit("/", 1)[-1] for p in paths] == list(FIGURES)
    for name in FIGURES:
        path = folder / name
        assert path.exists(), name
        assert 5_000 < path.stat().st_size < 3_000_000, (name, path.stat().st_size)
        width, height = png_size(path)
        assert 400 <= width <= 3000 and 250 <= height <= 2500, (name, width, height)


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib", reason="matplotlib not installed (moempi[plot])")


def test_full_depth_figures(mpl, tmp_path):
    """61 layers, 8 experts: the DeepSeek-V3 depth fits legibly (sizes bounded)."""
    out = fake_output(tmp_path / "out.h5")
    check_figures(write_plots(str(out), str(tmp_path / "plots")), tmp_path / "plots")


def test_no_exchange_measured(mpl, tmp_path):
    """A one-rank run has no overlap figures to draw: the figure says so instead of failing."""
    out = fake_output(tmp_path / "out.h5", layers=6, dense=1, experts=4, ranks=1, overlap=False)
    check_figures(write_plots(str(out), str(tmp_path / "p")), tmp_path / "p")


def test_real_run_output(mpl, files, tmp_path):
    """From a real 2-rank `moempi run` output."""
    out = tmp_path / "run.h5"
    mpirun(2, "run", "--model", files / "e4.h5", "--tokens", files / "tok.h5", "--output", out,
           "--micro-batches", "2")
    check_figures(write_plots(str(out), str(tmp_path / "plots")), tmp_path / "plots")


def test_not_an_output(mpl, tmp_path):
    bad = tmp_path / "tokens.h5"
    with h5py.File(bad, "w") as f:
        f["tokens"] = np.zeros((2, 4), np.float32)
    with pytest.raises(MoempiError, match="not a moempi output"):
        write_plots(str(bad), str(tmp_path / "p"))


def test_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib -> ImportError
    out = fake_output(tmp_path / "out.h5", layers=4, dense=1)
    with pytest.raises(MoempiError, match=r"pip install 'moempi\[plot\]'"):
        write_plots(str(out), str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()
