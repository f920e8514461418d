"""Every run explains itself: the time model's prediction recorded beside the measurement
(`/timings/predicted`, from `run.calibration` or the run's start-up probes) and shown by
`moempi inspect`, per layer and for the forward."""

from __future__ import annotations

import json
import re
import shutil

import h5py
import numpy as np

from conftest import moempi, mpirun
from moempi.io.topology import Topology
from moempi.model.shapes import ModelMeta
from moempi.perf.analytic import Calibration
from moempi.perf.predict import JobRun, forecast_job, predicted_seconds
from test_errors import expect_failure

STARTUP = "start-up probes (GEMMs and wire only)"


def tiny_calibration(path) -> Calibration:
    """A hand-written calibration at 2 ranks, CPU terms included."""
    cal = Calibration.from_measurements(
        2e10, {2: (5e-5, 2e9)}, "test machine",
        cpu={2: (1.5e10, 6e9, 2e-9, 3e-4, 1e-8, 3e-9, 1e-8, 0.5)})
    cal.save(str(path))
    return cal


def test_run_records_the_calibrated_prediction_and_inspect_shows_it(files, tmp_path):
    """With `run.calibration` the run records what `forecast_job`/`predicted_seconds` give
    for its own recorded routing; `inspect` prints it per layer and for the forward."""
    cal = tiny_calibration(tmp_path / "cal.json")
    out = tmp_path / "out.h5"
    proc = mpirun(2, "run", "--model", files / "e4.h5", "--tokens", files / "tok.h5",
                  "--output", out, "--micro-batches", "2",
                  "--set", f"run.calibration={tmp_path / 'cal.json'}",
                  "--set", "pipeline.pure_comm_layers=all")
    assert "model's prediction: forward" in proc.stdout
    with h5py.File(out, "r") as f:
        assert "prediction_error" not in f.attrs
        meta = ModelMeta(**json.loads(f.attrs["model_meta"]))
        predicted = f["timings/predicted"][()]
        traffic, computed = f["stats/traffic"][()], f["stats/tokens_per_rank"][()]
        assert f.attrs["prediction_source"] == f"calibration {tmp_path / 'cal.json'} (test machine)"
        assert f["timings/predicted"].attrs["units"] == "s"
        assert [d.label for d in f["timings/predicted"].dims] == ["layer"]
        assert json.loads(f.attrs["prediction_calibration_ranks"]) == [2]
        node_ranks = int(f.attrs["gpus_per_node"])
        total = float(f.attrs["predicted_forward_seconds"])
    job = JobRun(ranks=2, tokens_per_rank=150, micro_batches=2, precision="fp32", overlap=True,
                 tp=1, batch_tokens=150, dispatch="direct", gpus_per_node=node_ranks)
    hw = cal.hardware(2, Topology(nodes=1, gpus_per_node=node_ranks))
    expected = predicted_seconds(forecast_job(meta, hw, job, traffic, computed), job)
    np.testing.assert_allclose(predicted, expected, rtol=1e-12)
    assert total == sum(predicted) and (predicted > 0).all()

    shown = moempi("inspect", out).stdout
    assert "nan" not in shown.lower()
    assert re.search(r"predicted ms +error", shown)
    assert re.search(r"^predicted: [0-9.]+ s \(.* the measured\), from calibration ", shown, re.M)
    row = re.search(r"^    1   moe .*$", shown, re.M).group(0).split()
    assert float(row[9]) == round(predicted[1] * 1e3, 2) and row[10].endswith("%")
    assert re.search(r"^    0 dense .* n/a$", shown, re.M)

    # an output written before predictions were recorded still inspects
    old = tmp_path / "old.h5"
    shutil.copy(out, old)
    with h5py.File(old, "r+") as f:
        del f["timings/predicted"]
        for name in [a for a in f.attrs if a.startswith("predict")]:
            del f.attrs[name]
    shown = moempi("inspect", old).stdout
    assert "predicted: no prediction recorded" in shown and "nan" not in shown.lower()
    assert re.search(r"^    1   moe .* +- +- .*$", shown, re.M)


def test_run_without_calibration_records_its_start_up_probes(files, tmp_path):
    """No `run.calibration`: the figures are the run's own probes, labelled GEMMs and wire
    only (2 replicas: the prediction is one replica's, 1 rank)."""
    out = tmp_path / "out.h5"
    mpirun(2, "run", "--model", files / "e4.h5", "--tokens", files / "tok.h5", "--output", out,
           "--micro-batches", "1", "--set", "parallel.dp=2")
    with h5py.File(out, "r") as f:
        assert "prediction_error" not in f.attrs
        assert f.attrs["prediction_source"] == STARTUP
        predicted = f["timings/predicted"][()]
        hw = json.loads(f.attrs["prediction_hardware"])
        assert json.loads(f.attrs["prediction_job"])["ranks"] == 1
    assert predicted.shape == (6,) and np.isfinite(predicted).all() and (predicted > 0).all()
    assert hw["link"] == "measured" and hw["gemm_flops"] > 0 and hw["token_elem_s"] == 0
    shown = moempi("inspect", out).stdout
    assert f"from {STARTUP}; the CPU work beside the GEMMs" in shown
    assert "nan" not in shown.lower()


def test_a_bad_calibration_fails_on_every_rank_before_any_work(files, tmp_path):
    """A missing or invalid calibration: one line naming the key and the file, no output."""
    args = ["--model", files / "e4.h5", "--tokens", files / "tok.h5"]
    missing = tmp_path / "missing.json"
    expect_failure(tmp_path, 2, [*args, "--set", f"run.calibration={missing}"],
                   f"run.calibration: {missing}: calibration file not found")
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"format": "something else"}')
    expect_failure(tmp_path, 2, [*args, "--set", f"run.calibration={wrong}"],
                   f"run.calibration: {wrong}: not a moempi calibration")


class _Output:
    """The attributes `inspect` reads, without a file."""

    def __init__(self, **attrs):
        self.attrs = {k: json.dumps(v) if isinstance(v, (dict, list)) else v
                      for k, v in attrs.items()}


def test_inspect_names_mpich_cells_only_where_they_explain_a_low_overlap():
    """MPICH's 8 KiB shared-memory cell is named (with the setting to change) for a low
    overlap on one node with exchanges that could overlap; not with 1 MiB cells, a high
    overlap, one micro-batch, or an output that did not record its MPI settings."""
    from moempi.reports.inspect import _relative, mpich_cells
    cfg = {"pipeline": {"overlap": True}}

    def said(mean_overlap=5.0, micro=4, env=None, node_ranks=2):
        attrs = dict(micro_batches=micro, world_size=2, node={"ranks": node_ranks, "cores": 2},
                     versions={"mpi": "MPICH Version: 5.0.2"}, model_meta={})
        if env is not None:
            attrs["mpi_env"] = env
        return mpich_cells(_Output(**attrs), cfg, mean_overlap)

    line, = said(env={})
    assert "8 KiB here" in line and "MPIR_CVAR_CH4_SHM_POSIX_IQUEUE_CELL_SIZE=1048576" in line
    assert not said(env={"MPIR_CVAR_CH4_SHM_POSIX_IQUEUE_CELL_SIZE": "1048576"})
    assert not said(mean_overlap=45.0, env={}) and not said(micro=1, env={})
    assert not said(env=None) and not said(env={}, node_ranks=1)
    assert _relative(1.3, 1.0) == "30% more than" and _relative(0.5, 1.0) == "50% less than"
    assert _relative(3.0, 1.0) == "3.0 x"
