"""The job scripts in jobs/ submitted to a real single-node Slurm brought up on localhost.

tests/slurm/cluster.sh starts munged, slurmctld and slurmd under a temporary folder; every
test submits a script from jobs/ unchanged (only MOEMPI_* variables and sbatch options
differ), waits for a final state and checks the output against the float64 reference.
Skipped when Slurm is not installed (.ci/slurm-setup.sh) or cannot be brought up, unless
MOEMPI_REQUIRE_SLURM=1 (CI), which turns those skips into failures.
The workstation launcher (jobs/moempi-local.sh) is tested without Slurm.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import BIN, MPI_ENV, moempi
from reference import forward, rel_l2

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
EXACT = 1e-4
JOB_TIMEOUT = 120          # seconds any one job may take before the test cancels it and fails
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
REQUIRE = os.environ.get("MOEMPI_REQUIRE_SLURM") == "1"
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _unavailable(reason: str):
    if REQUIRE:
        pytest.fail(f"MOEMPI_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


# -- the cluster ------------------------------------------------------------------------------
class Cluster:
    """A running test cluster: submit, wait, read the job's state."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_",
                                                                            "SRUN_", "MOEMPI_"))}
        self.env.update(MPI_ENV)
        # inside an allocation Hydra must start its proxies through Slurm, not fork
        self.env.pop("HYDRA_LAUNCHER", None)
        self.env.pop("MPIEXEC_TIMEOUT", None)
        self.env.update(SLURM_CONF=str(folder / "slurm.conf"), PATH=SBIN,
                        MOEMPI_VENV=str(BIN.parent), MOEMPI_BACKEND="numpy",
                        MOEMPI_PROBE_TIMEOUT="60")

    def cmd(self, *args, timeout=30, check=True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*map(str, args)], capture_output=True, text=True, env=self.env,
                              timeout=timeout)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(map(str, args))}: exit {proc.returncode}\n"
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    def submit(self, script: str, *sbatch_args, cwd: Path, env: dict) -> str:
        """sbatch jobs/SCRIPT with MOEMPI_* from ``env``; returns the job id."""
        proc = subprocess.run(["sbatch", "--parsable", f"--chdir={cwd}", *map(str, sbatch_args),
                               str(JOBS / script)], capture_output=True, text=True, timeout=30,
                              env={**self.env, **{k: str(v) for k, v in env.items()}})
        assert proc.returncode == 0, f"sbatch {script} failed:\n{proc.stderr}"
        return proc.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict]:
        """``scontrol show job -o``, one dict per job (every task of an array)."""
        proc = self.cmd("scontrol", "show", "job", "-o", job_id, check=False)
        if proc.returncode:
            return []
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in proc.stdout.splitlines()
                if line.strip()]

    def wait(self, job_id: str, tasks: int = 1, timeout: float = JOB_TIMEOUT,
             logs: list[Path] = ()) -> list[dict]:
        """Wait until the job (all ``tasks`` array tasks) reaches a final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs(job_id)
            if len(jobs) >= tasks and all(j.get("JobState") in FINAL for j in jobs):
                return sorted(jobs, key=lambda j: int(j.get("ArrayTaskId") or 0))
            time.sleep(0.25)
        self.cmd("scancel", job_id, check=False)
        text = "\n".join(f"--- {p}\n{p.read_text()}" for p in logs if p.exists())
        pytest.fail(f"job {job_id} not finished after {timeout} s: {self.jobs(job_id)}\n{text}")

    def cancel_all(self) -> None:
        ids = self.cmd("squeue", "-h", "-o", "%A", check=False).stdout.split()
        if ids:
            self.cmd("scancel", *ids, check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.cmd(
                    "squeue", "-h", "-o", "%A", check=False).stdout.strip():
                time.sleep(0.25)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("slurmctld", path=SBIN) is None:
        _unavailable("Slurm is not installed (slurmctld not found; .ci/slurm-setup.sh installs "
                     "slurm-wlm and munge)")
    if os.geteuid() != 0:
        _unavailable("the test Slurm needs root (slurmd runs as root)")
    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "PATH": SBIN}
    try:
        proc = subprocess.run([str(CLUSTER), "up", str(folder)], capture_output=True, text=True,
                              timeout=90, env=env)
    except subprocess.TimeoutExpired:
        subprocess.run([str(CLUSTER), "down", str(folder)], timeout=60, env=env)
        _unavailable("the test Slurm did not come up within 90 s")
    if proc.returncode:
        _unavailable(f"the test Slurm did not come up: {proc.stderr.strip()}")
    c = Cluster(folder)
    try:
        yield c
    finally:
        try:
            c.cancel_all()
        finally:
            subprocess.run([str(CLUSTER), "down", str(folder)], timeout=60, env=env)


@pytest.fixture(scope="module")
def inputs(cluster):
    """A tiny model and 96 tokens, and their float64 reference."""
    d = cluster.folder / "inputs"
    d.mkdir()
    moempi("init-model", d / "model.h5", "--preset", "tiny", "--seed", "7")
    moempi("make-tokens", d / "tokens.h5", "-n", "96", "--model", d / "model.h5", "--seed", "8")
    ref = forward(str(d / "model.h5"), str(d / "tokens.h5"))
    return {"MOEMPI_MODEL": d / "model.h5", "MOEMPI_TOKENS": d / "tokens.h5"}, ref


def hidden(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["hidden"][()]


def log_text(path: Path) -> str:
    return path.read_text() if path.exists() else f"(no log {path})"


def completed(job: dict, log: Path) -> None:
    assert job["JobState"] == "COMPLETED", f"{job['JobState']} ({job.get('ExitCode')}):\n" \
                                           f"{log_text(log)}"


def gpu_script(cluster, env: dict, tmp_path: Path, tasks: int, srun_mpi: str, name: str):
    """jobs/moempi-gpu.sbatch on ``tasks`` tasks with ``srun --mpi=srun_mpi``, output
    ``name-{job}.h5``; waits for it: ``(job, state, log)``."""
    job = cluster.submit("moempi-gpu.sbatch", "--nodes=1", f"--ntasks-per-node={tasks}",
                         "--cpus-per-task=1", cwd=tmp_path,
                         env={**env, "MOEMPI_SRUN_MPI": srun_mpi,
                              "MOEMPI_OUTPUT": tmp_path / f"{name}-{{job}}.h5"})
    log = tmp_path / f"moempi-{job}.log"
    [state] = cluster.wait(job, logs=[log])
    return job, state, log


def reference_output(out: Path, ref: np.ndarray) -> h5py.File:
    """``out`` exists and its hidden states are the reference's; the file, open, for more checks."""
    assert out.exists(), f"no {out.name} in {sorted(p.name for p in out.parent.iterdir())}"
    assert rel_l2(hidden(out), ref) <= EXACT
    return h5py.File(out, "r")


# -- the scripts under Slurm ------------------------------------------------------------------
def test_sbatch_mpiexec_inside_allocation(cluster, inputs, tmp_path):
    """jobs/moempi-mpirun.sbatch: the venv's mpiexec (Hydra) starts 2 ranks through Slurm."""
    env, ref = inputs
    job = cluster.submit("moempi-mpirun.sbatch", "--nodes=1", "--ntasks-per-node=2",
                         "--cpus-per-task=1", cwd=tmp_path, env=env)
    log = tmp_path / f"moempi-mpirun-{job}.log"          # the script's own --output pattern
    [state] = cluster.wait(job, logs=[log])
    completed(state, log)
    out = tmp_path / f"moempi-{job}.h5"                  # default output: moempi-{job}.h5
    with reference_output(out, ref) as f:
        assert f.attrs["world_size"] == 2
    assert "world check: 2 ranks" in log_text(log)


def test_srun_pmi2_direct(cluster, inputs, tmp_path):
    """jobs/moempi-gpu.sbatch with srun --mpi=pmi2: 3 ranks, each asking for one (stand-in) GPU."""
    env, ref = inputs
    job, state, log = gpu_script(cluster, env, tmp_path, 3, "pmi2", "srun")
    completed(state, log)
    assert "gres:gpu:1" in state.get("TresPerTask", ""), state    # the header's --gpus-per-task
    out = tmp_path / f"srun-{job}.h5"
    with reference_output(out, ref) as f:
        assert f.attrs["world_size"] == 3
    assert "world check: 3 ranks" in log_text(log)


def test_array_sweep(cluster, inputs, tmp_path):
    """jobs/moempi-sweep.sbatch as a 3-task array: one output and one log per task (%A_%a).

    Launched with mpiexec (Hydra through Slurm), so the array also covers that launcher.
    """
    env, ref = inputs
    job = cluster.submit("moempi-sweep.sbatch", "--array=0-2", "--nodes=1",
                         "--ntasks-per-node=2", "--cpus-per-task=1", cwd=tmp_path,
                         env={**env, "MOEMPI_SWEEP_KEY": "pipeline.micro_batches",
                              "MOEMPI_SWEEP_VALUES": "1 2 3", "MOEMPI_LAUNCHER": "mpiexec"})
    logs = [tmp_path / f"moempi-sweep-{job}_{i}.log" for i in range(3)]
    states = cluster.wait(job, tasks=3, logs=logs)
    assert [s.get("ArrayTaskId") for s in states] == ["0", "1", "2"]
    for i, (state, log) in enumerate(zip(states, logs)):
        completed(state, log)
        out = tmp_path / f"moempi-sweep-{job}_{i}.h5"
        with reference_output(out, ref) as f:
            config = json.loads(f.attrs["config"])
            assert config["pipeline"]["micro_batches"] == i + 1
            assert int(f.attrs["micro_batches"]) == i + 1


def test_world_size_mismatch_fails_clearly(cluster, inputs, tmp_path):
    """srun --mpi=none starts singletons: the job must fail before computing, and say why."""
    env, _ = inputs
    job, state, log = gpu_script(cluster, env, tmp_path, 2, "none", "mismatch")
    text = log_text(log)
    assert state["JobState"] == "FAILED", f"{state['JobState']}:\n{text}"
    assert "asked for 2 MPI ranks but the launcher started 2 process(es) reporting world " \
           "size 1" in text, text
    assert "singletons" in text, text
    assert not list(tmp_path.glob("mismatch-*.h5"))
    assert "moempi run" not in text          # failed before the run was started


# -- requeue-safe resume ----------------------------------------------------------------------
def _has_checkpoint() -> bool:
    proc = subprocess.run([str(BIN / "moempi"), "run", "--help"], capture_output=True, text=True,
                          timeout=60)
    return "--checkpoint" in proc.stdout


@pytest.fixture(scope="module")
def long_inputs(cluster):
    """A 61-layer model and enough tokens for a job of many short batches."""
    if not _has_checkpoint():
        pytest.skip("checkpointing not available (`moempi run --help` has no --checkpoint)")
    d = cluster.folder / "long"
    d.mkdir()
    moempi("init-model", d / "model.h5", "--preset", "small", "--seed", "11")
    moempi("make-tokens", d / "tokens.h5", "-n", "480", "--model", d / "model.h5", "--seed", "12")
    return {"MOEMPI_MODEL": d / "model.h5", "MOEMPI_TOKENS": d / "tokens.h5",
            "MOEMPI_BATCH_TOKENS": "8", "MOEMPI_MICRO_BATCHES": "2",
            # balancing on: the bias carried from batch to batch must survive the restart too
            "MOEMPI_SET": "balance.enabled=true balance.rate=0.01"}


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _same_result(a: Path, b: Path) -> None:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert np.array_equal(fa["hidden"][()], fb["hidden"][()]), "hidden differs"
        # a token lost or computed twice shows up in the counts
        assert np.array_equal(fa["stats/tokens_per_expert"][()], fb["stats/tokens_per_expert"][()])
        assert np.array_equal(fa["stats/tokens_per_rank"][()], fb["stats/tokens_per_rank"][()])


def _interrupt_mid_run(cluster, job: str, ckpt: Path, out: Path, log: Path, kill) -> None:
    """Once the first batch is checkpointed (and before the output exists) ``kill`` the job."""
    _wait_for(lambda: ckpt.exists() or any(j.get("JobState") in FINAL
                                           for j in cluster.jobs(job)),
              JOB_TIMEOUT, f"checkpoint {ckpt.name} of job {job}")
    assert ckpt.exists() and not out.exists(), \
        f"job {job} finished before it could be interrupted:\n{log_text(log)}"
    kill()


def test_requeue_resumes_from_checkpoint(cluster, long_inputs, tmp_path):
    """Preempt-style `scontrol requeue` mid-run: the job restarts, resumes, output == uninterrupted."""
    base_dir, run_dir = tmp_path / "base", tmp_path / "run"
    base_dir.mkdir(), run_dir.mkdir()
    common = ("--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1")
    # mpiexec, not srun --mpi=pmi2: a requeued job reuses its job and step ids, and the MPICH
    # wheel's ranks then find the /dev/shm segments the killed step left (docs/slurm.md)
    job = cluster.submit("moempi-mpirun.sbatch", *common, cwd=run_dir, env=long_inputs)
    log, ckpt, out = (run_dir / f"moempi-mpirun-{job}.log", run_dir / f"moempi-{job}.ckpt",
                      run_dir / f"moempi-{job}.h5")
    _interrupt_mid_run(cluster, job, ckpt, out, log,
                       lambda: cluster.cmd("scontrol", "requeue", job))
    # Slurm holds a requeued job for ~2 minutes (EligibleTime); release it once it is pending
    _wait_for(lambda: any(j.get("JobState") == "PENDING" for j in cluster.jobs(job)), 60,
              f"job {job} to be pending again after the requeue")
    # and the node done with the killed run: slurmd refuses a relaunch while the job's old
    # credential is still revoked ("Job credential revoked"), which fails the job
    _wait_for(lambda: cluster.cmd("sinfo", "-h", "-o", "%t").stdout.strip() == "idle", 60,
              "the node to be idle after the requeue")
    time.sleep(2)
    cluster.cmd("scontrol", "update", f"JobId={job}", "StartTime=now")
    [state] = cluster.wait(job, timeout=2 * JOB_TIMEOUT, logs=[log])
    completed(state, log)
    assert int(state["Restarts"]) == 1, state
    text = log_text(log)
    assert "restart 0" in text and "restart 1" in text, text      # one log, both runs
    base = cluster.submit("moempi-mpirun.sbatch", *common, cwd=base_dir,
                          env={**long_inputs, "MOEMPI_CHECKPOINT": "none"})
    [base_state] = cluster.wait(base, logs=[base_dir / f"moempi-mpirun-{base}.log"])
    completed(base_state, base_dir / f"moempi-mpirun-{base}.log")
    _same_result(out, base_dir / f"moempi-{base}.h5")


def test_scancel_then_resubmit_resumes(cluster, long_inputs, tmp_path):
    """scancel mid-run, submit again with the same checkpoint: output == uninterrupted run."""
    base_dir, run_dir = tmp_path / "base", tmp_path / "run"
    base_dir.mkdir(), run_dir.mkdir()
    common = ("--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1")
    ckpt, out = run_dir / "job.ckpt", run_dir / "out.h5"
    env = {**long_inputs, "MOEMPI_CHECKPOINT": ckpt, "MOEMPI_OUTPUT": out}
    first = cluster.submit("moempi-mpirun.sbatch", *common, cwd=run_dir, env=env)
    log1 = run_dir / f"moempi-mpirun-{first}.log"
    _interrupt_mid_run(cluster, first, ckpt, out, log1,
                       lambda: cluster.cmd("scancel", first))
    [state] = cluster.wait(first, logs=[log1])
    assert state["JobState"] == "CANCELLED", state
    assert not out.exists()
    second = cluster.submit("moempi-mpirun.sbatch", *common, cwd=run_dir, env=env)
    log2 = run_dir / f"moempi-mpirun-{second}.log"
    [state] = cluster.wait(second, logs=[log2])
    completed(state, log2)
    base = cluster.submit("moempi-mpirun.sbatch", *common, cwd=base_dir,
                          env={**long_inputs, "MOEMPI_CHECKPOINT": "none"})
    [base_state] = cluster.wait(base, logs=[base_dir / f"moempi-mpirun-{base}.log"])
    completed(base_state, base_dir / f"moempi-mpirun-{base}.log")
    _same_result(out, base_dir / f"moempi-{base}.h5")


# -- the workstation launcher (no Slurm needed) -----------------------------------------------
def test_local_launcher(tmp_path):
    """jobs/moempi-local.sh: 2 ranks, output moempi-local.h5, never replaced unless asked."""
    moempi("init-model", tmp_path / "m.h5", "--preset", "tiny", "--seed", "9")
    moempi("make-tokens", tmp_path / "t.h5", "-n", "40", "--model", tmp_path / "m.h5")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MOEMPI_"))}
    env.update(MPI_ENV, MOEMPI_NP="2", MOEMPI_VENV=str(BIN.parent), MOEMPI_OVERSUBSCRIBE="1",
               MOEMPI_MODEL=str(tmp_path / "m.h5"), MOEMPI_TOKENS=str(tmp_path / "t.h5"))

    def launch(**extra):
        return subprocess.run([str(JOBS / "moempi-local.sh")], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, env={**env, **extra})

    proc = launch()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "world check: 2 ranks" in proc.stdout
    out = tmp_path / "moempi-local.h5"
    ref = forward(str(tmp_path / "m.h5"), str(tmp_path / "t.h5"))
    assert rel_l2(hidden(out), ref) <= EXACT
    before = out.stat().st_mtime_ns
    proc = launch()
    assert proc.returncode != 0 and "exists" in proc.stderr, proc.stdout + proc.stderr
    assert out.stat().st_mtime_ns == before
    proc = launch(MOEMPI_OVERWRITE="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.stat().st_mtime_ns != before


def test_local_launcher_rejects_bad_rank_count(tmp_path):
    env = {**os.environ, "MOEMPI_NP": "two", "MOEMPI_MODEL": "m.h5", "MOEMPI_TOKENS": "t.h5",
           "MOEMPI_VENV": str(BIN.parent)}
    proc = subprocess.run([str(JOBS / "moempi-local.sh")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=30, env=env)
    assert proc.returncode == 1
    assert "MOEMPI_NP must be a positive integer" in proc.stderr
