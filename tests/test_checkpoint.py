"""Requeue-safe runs: a job killed after some batches resumes from its checkpoint, same output."""

from __future__ import annotations

import h5py
import numpy as np

from conftest import mpirun

KILL = """
import os, sys
from mpi4py import MPI
from moempi.runtime import checkpoint, tune
from moempi import cli
if os.environ.get("PROBE_CHOICE"):          # what the start-up timing chooses in this start
    fastest = int(os.environ["PROBE_CHOICE"])
    tune.candidates = lambda rows, most: [1, fastest]
    tune.segment_seconds = lambda m, measured: float(m != fastest)
original = checkpoint.Checkpoint.save
def save(self, batch, *args, **kwargs):
    original(self, batch, *args, **kwargs)
    if batch == int(os.environ["KILL_AFTER_BATCH"]) and MPI.COMM_WORLD.rank == 1:
        os._exit(9)              # like SIGKILL from scancel or preemption: no clean-up at all
checkpoint.Checkpoint.save = save
sys.argv = ["moempi", "run"] + sys.argv[1:]
cli.main()
"""

SETTINGS = ["--set", "pipeline.batch_tokens=10", "--set", "balance.enabled=true",
            "--set", "balance.rate=0.01", "--save-routing"]
COMPARED = ["hidden", "stats/tokens_per_expert", "stats/tokens_per_rank", "stats/traffic",
            "balance/bias", "balance/tokens_per_expert", "routing/home_rank",
            "routing/003/topk_idx", "routing/003/dest_rank"]


def test_killed_job_resumes_to_identical_output(files, tmp_path):
    common = ["--model", files / "e4.h5", "--tokens", files / "tok.h5", *SETTINGS]
    full = tmp_path / "full.h5"
    mpirun(3, "run", *common, "--output", full)
    script, out, ckpt = tmp_path / "kill.py", tmp_path / "out.h5", tmp_path / "ckpt"
    script.write_text(KILL)
    proc = mpirun(3, script, *common, "--output", out, "--checkpoint", ckpt, python=True,
                  check=False, env={"KILL_AFTER_BATCH": "4"})
    assert proc.returncode != 0 and not out.exists()
    assert sorted(p.name for p in ckpt.iterdir()) == [f"batch-{b:05d}.h5" for b in range(5)]
    proc = mpirun(3, "run", *common, "--output", out, "--checkpoint", ckpt)
    assert "5 of 10 batch(es) already done" in proc.stdout
    assert not ckpt.exists()                      # removed once the output is complete
    with h5py.File(full, "r") as a, h5py.File(out, "r") as b:
        for name in COMPARED:
            assert np.array_equal(a[name][()], b[name][()]), name
        assert b.attrs["resumed_from_batch"] == 5


def test_checkpoint_from_another_run_is_refused(files, tmp_path):
    common = ["--model", files / "e4.h5", "--tokens", files / "tok.h5", *SETTINGS]
    script, ckpt = tmp_path / "kill.py", tmp_path / "ckpt"
    script.write_text(KILL)
    mpirun(2, script, *common, "--output", tmp_path / "a.h5", "--checkpoint", ckpt,
           python=True, check=False, env={"KILL_AFTER_BATCH": "1"})
    proc = mpirun(2, "run", *common, "--output", tmp_path / "b.h5", "--checkpoint", ckpt,
                  "--precision", "bf16", check=False)
    assert proc.returncode != 0 and "checkpoint belongs to another run" in proc.stderr
    assert "run.precision: was fp32, now bf16" in proc.stderr
    assert not (tmp_path / "b.h5").exists()


def test_resume_reuses_the_recorded_micro_batch_count(files, tmp_path):
    """The timing chose 3 in the killed start; the resumption keeps 3 (it would choose
    otherwise), and naming another count is refused, naming the setting.  The output equals
    an uninterrupted run that made the same choice (its first batch ran its first MoE layers
    with 1 micro-batch while choosing: not a run at 3 throughout, whose micro-batches cut
    those layers' GEMMs differently, and on a BLAS with a row quantum of 12 change bits)."""
    common = ["--model", files / "deep.h5", "--tokens", files / "tok.h5",
              "--set", "pipeline.batch_tokens=50"]
    script, ckpt, out = tmp_path / "kill.py", tmp_path / "ckpt", tmp_path / "out.h5"
    script.write_text(KILL)
    full = tmp_path / "full.h5"
    mpirun(2, script, *common, "--output", full, python=True,
           env={"KILL_AFTER_BATCH": "99", "PROBE_CHOICE": "3"})
    mpirun(2, script, *common, "--output", out, "--checkpoint", ckpt, python=True, check=False,
           env={"KILL_AFTER_BATCH": "1", "PROBE_CHOICE": "3"})
    other = mpirun(2, "run", *common, "--output", out, "--checkpoint", ckpt,
                   "--micro-batches", "2", check=False)
    assert other.returncode != 0 and not out.exists()
    assert "pipeline.micro_batches: was 3 (the timed choice), now 2" in other.stderr
    proc = mpirun(2, "run", *common, "--output", out, "--checkpoint", ckpt)
    assert "2 of 3 batch(es) already done" in proc.stdout and "3 micro-batch(es)" in proc.stdout
    with h5py.File(full, "r") as a, h5py.File(out, "r") as b:
        assert b.attrs["micro_batches"] == 3
        assert np.array_equal(a["hidden"][()], b["hidden"][()])          # 61 layers, bit for bit


def test_job_id_in_output_name(files, tmp_path):
    env = {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}
    mpirun(2, "run", "--model", files / "e4.h5", "--tokens", files / "tok.h5",
           "--output", tmp_path / "out-{job}.h5", env=env)
    assert (tmp_path / "out-77_3.h5").exists()
