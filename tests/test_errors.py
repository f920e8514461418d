"""Bad input: a clear one-line error, non-zero exit within seconds on every rank, no output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import h5py
import numpy as np
import pytest

from conftest import MOEMPI, MPI_ENV, MPIEXEC, moempi, mpirun, names


def our_lines(stderr: str) -> list[str]:
    """moempi's own error lines (MPICH adds one 'Abort(1) on node ...' line to an abort)."""
    assert "Traceback" not in stderr, stderr
    return [l for l in stderr.splitlines() if l.strip() and not l.startswith("Abort(")]


def single_line(stderr: str) -> bool:
    """One line of error (per rank that says it), no traceback."""
    lines = [l for l in stderr.splitlines() if l.strip()]
    return len(set(lines)) == 1 and "Traceback" not in stderr


def expect_failure(tmp_path, n, args, message, timeout=40):
    """The job fails within seconds with one line (per rank that says it) holding ``message``,
    no traceback, no output or temporary file, and no process of it left running."""
    out = tmp_path / "out.h5"
    start = time.monotonic()
    proc = mpirun(n, "run", *args, "--output", out, check=False, timeout=timeout)
    assert proc.returncode != 0, proc.stdout
    assert time.monotonic() - start < timeout
    assert message in proc.stderr, proc.stderr
    assert len(set(our_lines(proc.stderr))) == 1, proc.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".out.h5.partial*"))
    assert not processes_of(tmp_path)
    return proc


def processes_of(tmp_path) -> list[int]:
    """Processes still running whose command line names ``tmp_path`` (this test's files)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if str(tmp_path).encode() in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def copy_model(files, tmp_path, name="e4.h5"):
    dst = tmp_path / "model.h5"
    shutil.copy(files / name, dst)
    return dst


def test_missing_model(files, tmp_path):
    expect_failure(tmp_path, 2, ["--model", tmp_path / "nope.h5", "--tokens", files / "tok.h5"],
                   "model file not found")


def test_truncated_model(files, tmp_path):
    model = copy_model(files, tmp_path)
    data = model.read_bytes()
    model.write_bytes(data[:len(data) // 2])
    proc = expect_failure(tmp_path, 2, ["--model", model, "--tokens", files / "tok.h5"],
                          str(model))
    assert "truncated" in proc.stderr or "cannot" in proc.stderr


def test_missing_dataset(files, tmp_path):
    model = copy_model(files, tmp_path)
    with h5py.File(model, "a") as f:
        del f["layers/003/gate"]
    expect_failure(tmp_path, 2, ["--model", model, "--tokens", files / "tok.h5"],
                   "missing dataset /layers/003/gate")


def model_with(files, tmp_path, name: str, value: np.ndarray):
    """A copy of the test model with dataset ``name`` replaced by ``value``."""
    model = copy_model(files, tmp_path)
    with h5py.File(model, "a") as f:
        del f[name]
        f[name] = value
    return model


def test_wrong_shape(files, tmp_path):
    model = model_with(files, tmp_path, "layers/002/norm", np.ones(63, dtype=np.float32))
    expect_failure(tmp_path, 2, ["--model", model, "--tokens", files / "tok.h5"],
                   "/layers/002/norm has shape (63,), expected (64,)")


def test_wrong_dtype(files, tmp_path):
    model = model_with(files, tmp_path, "layers/001/norm", np.ones(64, dtype=np.int32))
    expect_failure(tmp_path, 2, ["--model", model, "--tokens", files / "tok.h5"],
                   "unsupported dtype int32")


def test_hidden_mismatch(files, tmp_path):
    tokens = tmp_path / "t.h5"
    moempi("make-tokens", tokens, "-n", "10", "--hidden", "32")
    expect_failure(tmp_path, 2, ["--model", files / "e4.h5", "--tokens", tokens],
                   "tokens have hidden size 32 but the model")


def test_nan_in_tokens(files, tmp_path):
    tokens = tmp_path / "t.h5"
    shutil.copy(files / "tok.h5", tokens)
    with h5py.File(tokens, "a") as f:
        f["tokens"][250, 3] = np.nan            # on the last rank's shard
    expect_failure(tmp_path, 3, ["--model", files / "e4.h5", "--tokens", tokens],
                   "/tokens row 250 contains NaN or Inf")


def test_inf_in_expert_weights(files, tmp_path):
    """Only rank 1 reads expert 1's slab: it finds the Inf, every rank stops."""
    model = copy_model(files, tmp_path)
    with h5py.File(model, "a") as f:
        f["layers/004/experts/w_out"][1, 0, 0] = 0x7F80   # bf16 +Inf
    expect_failure(tmp_path, 4, ["--model", model, "--tokens", files / "tok.h5"],
                   "rank 1:")


def write_placement(tmp_path, **changes):
    p = {"format": "moempi-placement", "version": 1, "num_ranks": 2, "num_experts": 4,
         "layers": {"1": [[0], [1], [0], [1]]}}
    p.update(changes)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(p))
    return path


def test_placement_rank_out_of_range(files, tmp_path):
    p = write_placement(tmp_path, num_ranks=2, layers={"1": [[0], [1], [5], [1]]})
    expect_failure(tmp_path, 2, ["--model", files / "e4.h5", "--tokens", files / "tok.h5",
                                 "--placement", p, "--set", "parallel.allow_packing=true"],
                   "rank 5, which does not exist")


def test_placement_packing_not_allowed(files, tmp_path):
    p = write_placement(tmp_path)
    expect_failure(tmp_path, 2, ["--model", files / "e4.h5", "--tokens", files / "tok.h5",
                                 "--placement", p], "gives rank 0 two experts")


def test_placement_world_size(files, tmp_path):
    p = write_placement(tmp_path, num_ranks=4, layers={})
    expect_failure(tmp_path, 2, ["--model", files / "e4.h5", "--tokens", files / "tok.h5",
                                 "--placement", p], "placement is for 4 ranks")


def test_unknown_config_key(files, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\nmodel = "m.h5"\n[pipeline]\nmicro_batch = 3\n')
    expect_failure(tmp_path, 2, [cfg], "unknown key pipeline.micro_batch")


def test_cupy_backend_refused_until_verified(files, tmp_path):
    """It gave wrong results on a real GPU: refused unless asked for (before any GPU is used)."""
    expect_failure(tmp_path, 2, ["--model", files / "e4.h5", "--tokens", files / "tok.h5",
                                 "--set", "backend.name=cupy"], "backend cupy has not yet passed")


def test_bad_set_value(files, tmp_path):
    expect_failure(tmp_path, 2, ["--model", files / "e4.h5", "--tokens", files / "tok.h5",
                                 "--set", "pipeline.micro_batches=many"],
                   "pipeline.micro_batches must be int")


def test_existing_output_not_overwritten(files, tmp_path):
    out = tmp_path / "out.h5"
    out.write_bytes(b"keep me")
    proc = mpirun(2, "run", "--model", files / "e4.h5", "--tokens", files / "tok.h5",
                  "--output", out, check=False, timeout=40)
    assert proc.returncode != 0 and "output exists" in proc.stderr
    assert out.read_bytes() == b"keep me"


FAULT = """
import sys
from moempi import cli
from moempi.runtime import pipeline
from mpi4py import MPI
original = pipeline.MicroBatch._experts
def broken(self, layer, *args):
    if MPI.COMM_WORLD.rank == 1 and layer.index == 3:
        raise RuntimeError("injected failure")
    return original(self, layer, *args)
pipeline.MicroBatch._experts = broken
sys.argv = ["moempi", "run"] + sys.argv[1:]
cli.main()
"""


def test_one_rank_failing_mid_run_aborts_job(files, tmp_path):
    """An exception on one rank in the middle of the forward pass ends every rank promptly."""
    script = tmp_path / "fault.py"
    script.write_text(FAULT)
    out = tmp_path / "out.h5"
    start = time.monotonic()
    proc = mpirun(4, script, "--model", files / "e4.h5", "--tokens", files / "tok.h5",
                  "--output", out, python=True, check=False, timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - start < 30
    assert "rank 1" in proc.stderr and "injected failure" in proc.stderr
    assert not out.exists()


def test_help_without_mpi():
    proc = moempi("run", "--help")
    assert "mpiexec -n P moempi run" in proc.stdout
    for cmd in ("init-model", "make-tokens", "inspect", "info"):
        assert moempi(cmd, "--help").returncode == 0


def test_memory_check_refuses_what_cannot_fit(files, tmp_path):
    """The start-up memory check (the performance model's formulas) refuses, naming the need."""
    expect_failure(tmp_path, 2, ["--model", files / "e4.h5", "--tokens", files / "tok.h5",
                                 "--set", "run.gpu_memory_gb=0.0001"], "GB per GPU of")


# -- inputs are never destroyed ---------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3])
def test_output_naming_an_input_is_refused(files, tmp_path, n):
    """By another path to the same file, and with --overwrite: refused before any work."""
    model = copy_model(files, tmp_path)
    tokens = tmp_path / "tokens.h5"
    shutil.copy(files / "tok.h5", tokens)
    (tmp_path / "sub").mkdir()
    os.symlink(tokens, tmp_path / "sub" / "link.h5")
    before = model.read_bytes(), tokens.read_bytes()
    for flag, target in (("--output", tmp_path / "sub" / ".." / "model.h5"),
                         ("--output", tmp_path / "sub" / "link.h5"),
                         ("--checkpoint", tmp_path / "sub" / "link.h5")):
        start = time.monotonic()
        proc = mpirun(n, "run", "--model", model, "--tokens", tokens, flag, target,
                      "--overwrite", check=False, timeout=40)
        assert proc.returncode != 0 and time.monotonic() - start < 30
        assert "would destroy the input" in proc.stderr, proc.stderr
        assert single_line(proc.stderr)
    assert (model.read_bytes(), tokens.read_bytes()) == before


def test_make_tokens_onto_its_model_is_refused(files, tmp_path):
    model = copy_model(files, tmp_path)
    before = model.read_bytes()
    proc = moempi("make-tokens", model, "-n", "10", "--model", model, "--overwrite", check=False)
    assert proc.returncode == 1 and "would destroy the input" in proc.stderr
    assert model.read_bytes() == before


APPEARS = """
import sys
from moempi import cli
from moempi.io import hdf5
original = hdf5.OutputWriter.commit
def commit(self):                        # another job publishes the same output meanwhile
    open(self.path, "w").write("the other job's output")
    original(self)
hdf5.OutputWriter.commit = commit
sys.argv = ["moempi", "run"] + sys.argv[1:]
cli.main()
"""


def test_output_that_appeared_meanwhile_is_not_replaced(files, tmp_path):
    script, out = tmp_path / "appears.py", tmp_path / "out.h5"
    script.write_text(APPEARS)
    proc = mpirun(2, script, "--model", files / "e4.h5", "--tokens", files / "tok.h5",
                  "--output", out, python=True, check=False, timeout=60)
    assert proc.returncode != 0 and "appeared while this job ran" in proc.stderr
    assert out.read_text() == "the other job's output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["appears.py", "out.h5"]


def test_two_jobs_with_one_output(files, tmp_path):
    """Started together without --overwrite: one writes the output, the other fails."""
    out = tmp_path / "out.h5"
    cmd = [MPIEXEC, "-n", "1", *MOEMPI, "run", "--model", str(files / "e4.h5"),
           "--tokens", str(files / "tok.h5"), "--output", str(out), "--micro-batches", "1"]
    env = {**os.environ, **MPI_ENV}
    jobs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env) for _ in range(2)]
    results = [(job.wait(timeout=60), job.stderr.read()) for job in jobs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    failed = next(err for rc, err in results if rc)
    assert "output exists" in failed or "appeared while this job ran" in failed
    with h5py.File(out, "r") as f:
        assert f["hidden"].shape == (300, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]


# -- questionable input is refused or named ---------------------------------------------
@pytest.mark.parametrize("n", [1, 3])
def test_zero_tokens_refused(files, tmp_path, n):
    tokens = tmp_path / "empty.h5"
    with h5py.File(tokens, "w") as f:
        f.create_dataset("tokens", shape=(0, 64), dtype="f4")
    proc = expect_failure(tmp_path, n, ["--model", files / "e4.h5", "--tokens", tokens],
                          f"{tokens}: /tokens has no rows")
    assert single_line(proc.stderr)


@pytest.mark.parametrize("n", [1, 3])
def test_model_that_is_not_a_model_file(files, tmp_path, n):
    """A directory, a file of another format, a file locked by a writer: each said as such."""
    folder = tmp_path / "model_dir"
    folder.mkdir()
    other = tmp_path / "model.json"
    other.write_text('{"format": "moempi-placement"}')
    locked = copy_model(files, tmp_path)
    cases = [(folder, "is a directory, not a model file"),
             (other, "not an HDF5 file"),
             (locked, "locked by another process")]
    with h5py.File(locked, "a"):                     # a writer holds the lock meanwhile
        for model, message in cases:
            proc = expect_failure(tmp_path, n, ["--model", model, "--tokens", files / "tok.h5"],
                                  f"{model}: ")
            assert message in proc.stderr and single_line(proc.stderr), proc.stderr


# -- resources: checked before work, failures said in one line --------------------------
@pytest.mark.parametrize("n", [1, 3])
def test_host_memory_refused_before_compute(files, tmp_path, n):
    proc = expect_failure(tmp_path, n, ["--model", files / "e4.h5", "--tokens", files / "tok.h5",
                                        "--set", "run.host_memory_gb=0.0001"],
                          "GB of host memory")
    [line] = set(our_lines(proc.stderr))
    assert "(run.host_memory_gb): lower pipeline.batch_tokens" in line
    assert "loaded weights" not in proc.stdout


READS = """
import sys
from moempi import cli
from moempi.io import hdf5
original = hdf5.read_tokens
def read_tokens(path, start, stop):
    assert stop - start <= 16, f"read {stop - start} token rows at once"
    return original(path, start, stop)
hdf5.read_tokens = read_tokens
sys.argv = ["moempi", "run"] + sys.argv[1:]
cli.main()
"""


def test_run_reads_one_batch_of_tokens_at_a_time(files, tmp_path):
    script, out = tmp_path / "reads.py", tmp_path / "out.h5"
    script.write_text(READS)
    mpirun(2, script, "--model", files / "e4.h5", "--tokens", files / "tok.h5", "--output", out,
           "--set", "pipeline.batch_tokens=16", python=True)
    with h5py.File(out, "r") as f:
        assert f["hidden"].shape == (300, 64)


def test_make_tokens_checks_free_disk(tmp_path):
    out = tmp_path / "t.h5"
    proc = moempi("make-tokens", out, "-n", str(10**14), "--hidden", "7168", check=False)
    assert proc.returncode == 1 and single_line(proc.stderr)
    assert f"{out}: needs " in proc.stderr and "GiB free" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_disk_full_while_writing_is_one_line(tmp_path):
    """A real failed write (the job's file-size limit, as a full disk fails it): one line."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # the write fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / "t.h5"
    proc = subprocess.run([*MOEMPI, "make-tokens", str(out), "-n", "100000", "--hidden", "16"],
                          capture_output=True, text=True, preexec_fn=limit, timeout=60,
                          env={**os.environ, **MPI_ENV})
    assert proc.returncode == 1 and single_line(proc.stderr), proc.stderr
    assert f"{out}: file too large" in proc.stderr
    assert not list(tmp_path.iterdir())


FAULTS = """
import errno, os, sys
from mpi4py import MPI
from moempi import cli
from moempi.io import hdf5
from moempi.runtime import pipeline
if os.environ["FAULT"] == "memory":
    original = pipeline.MicroBatch._experts
    def experts(self, layer, *args):
        if MPI.COMM_WORLD.rank == MPI.COMM_WORLD.size - 1 and layer.index == 3:
            raise MemoryError("Unable to allocate 93.1 GiB for an array")
        return original(self, layer, *args)
    pipeline.MicroBatch._experts = experts
else:
    def array(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.tmp)
    hdf5.OutputWriter.array = array
sys.argv = ["moempi"] + sys.argv[1:]
cli.main()
"""


@pytest.mark.parametrize("n,fault,message", [(1, "memory", "rank 0: out of memory"),
                                             (3, "memory", "rank 2: out of memory"),
                                             (3, "disk", "out.h5: no space left on the device")])
def test_out_of_memory_or_disk_is_one_line(files, tmp_path, n, fault, message):
    script, out = tmp_path / "faults.py", tmp_path / "out.h5"
    script.write_text(FAULTS)
    args = [script, "run", "--model", files / "e4.h5", "--tokens", files / "tok.h5", "--output",
            out]
    proc = mpirun(n, *args, python=True, check=False, env={"FAULT": fault}, timeout=60)
    assert proc.returncode != 0
    [line] = our_lines(proc.stderr)
    assert message in line, line
    assert names(tmp_path) == ["faults.py"]
    if n == 1:                               # the traceback is there when asked for
        debug = mpirun(n, script, "--debug", *args[1:], python=True, check=False,
                       env={"FAULT": fault}, timeout=60)
        assert "Traceback" in debug.stderr and "MemoryError" in debug.stderr


@pytest.mark.parametrize("n", [1, 3])
def test_output_that_is_a_directory(files, tmp_path, n):
    (tmp_path / "out.h5").mkdir()
    proc = mpirun(n, "run", "--model", files / "e4.h5", "--tokens", files / "tok.h5",
                  "--output", tmp_path / "out.h5", check=False, timeout=40)
    assert proc.returncode == 1 and single_line(proc.stderr)
    assert "out.h5: output is a directory" in proc.stderr
