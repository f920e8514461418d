"""Weights read by rank 0 and sent (``run.weights = "rank0"``), and data-parallel replicas
compared by checksum before any compute (docs/design.md §3)."""

from __future__ import annotations

import os
import subprocess

import h5py
import numpy as np
import pytest

from conftest import MOEMPI, MPI_ENV, MPIEXEC, moempi, mpirun, names


def hidden(path):
    with h5py.File(path, "r") as f:
        return f["hidden"][()]


def mpmd(parts, timeout=120):
    """``mpiexec -n n1 -wdir D1 moempi ARGS1 : -n n2 -wdir D2 moempi ARGS2 ...``."""
    cmd = [MPIEXEC]
    for i, (n, wdir, args) in enumerate(parts):
        cmd += ([":"] if i else []) + ["-n", str(n), "-wdir", str(wdir), *MOEMPI,
                                       *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **MPI_ENV})


@pytest.mark.parametrize("n", [3, 4])
def test_only_rank0_sees_the_model(files, tmp_path, n):
    """Rank 0's working directory alone holds model.h5 (a relative path): with rank0 weights
    the job runs and equals a normal run bit for bit; with each rank reading, the others
    cannot find it and the job says so."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "model.h5").write_bytes((files / "e4.h5").read_bytes())
    args = ["run", "--model", "model.h5", "--tokens", files / "tok.h5", "--output", "out.h5",
            "--micro-batches", "2"]
    ref = tmp_path / "ref.h5"
    mpirun(n, "run", "--model", files / "e4.h5", "--tokens", files / "tok.h5", "--output",
           ref, "--micro-batches", "2")
    proc = mpmd([(1, a, [*args, "--weights", "rank0"]), (n - 1, b, [*args, "--weights", "rank0"])])
    assert proc.returncode == 0, proc.stderr
    assert "read by rank 0 and sent" in proc.stdout
    assert np.array_equal(hidden(a / "out.h5"), hidden(ref))
    assert names(b) == []                                 # nothing written where the others run
    failed = mpmd([(1, a, [*args, "-o", "each.h5"]), (n - 1, b, [*args, "-o", "each.h5"])])
    assert failed.returncode != 0 and "model.h5" in failed.stderr
    assert not (a / "each.h5").exists() and names(a) == ["model.h5", "out.h5"]


def test_replicas_that_read_different_files_are_refused(tmp_path):
    """dp = 2, each replica reading "model.h5" in its own directory: two different models
    of the same shape.  Refused before any compute, naming the array and the ranks."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    moempi("init-model", a / "model.h5", "--preset", "tiny", "--seed", "1")
    moempi("init-model", b / "model.h5", "--preset", "tiny", "--seed", "1")
    with h5py.File(b / "model.h5", "r+") as f:          # one expert slab differs in one value
        ds = f["layers/003/experts/w_out"]
        row = ds[1]
        row.flat[7] ^= 1
        ds[1] = row
    moempi("make-tokens", tmp_path / "t.h5", "-n", "40", "--hidden", "64")
    args = ["run", "--model", "model.h5", "--tokens", tmp_path / "t.h5", "--output", "out.h5",
            "--set", "parallel.dp=2"]
    proc = mpmd([(1, a, args), (1, b, args)])
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("moempi:")]
    assert len(lines) == 1 and "replicas differ" in lines[0], proc.stderr
    assert "layers/003/experts[1]" in lines[0] and "rank 1" in lines[0]
    assert names(a) == ["model.h5"] and names(b) == ["model.h5"]
    same = mpmd([(1, a, args), (1, a, args)])             # both replicas read a's file
    assert same.returncode == 0 and "replicas verified" in same.stdout, same.stderr
    shown = moempi("inspect", a / "out.h5").stdout
    assert "layout: ep 1 x dp 2 (replica 0: ranks 0-0; replica 1: ranks 1-1)" in shown
    assert "replicas verified" in shown


@pytest.mark.parametrize("n", [1, 3])
def test_a_bad_slab_read_by_rank0_stops_every_rank(tmp_path, n):
    """NaN in an expert slab that rank 0 reads for another rank: one line, non-zero exit on
    every rank, no output, no rank left waiting for its slab."""
    model, tokens, out = tmp_path / "m.h5", tmp_path / "t.h5", tmp_path / "out.h5"
    moempi("init-model", model, "--preset", "tiny", "--dtype", "float32")
    with h5py.File(model, "r+") as f:
        ds = f["layers/004/experts/w_in"]
        slab = ds[3]
        slab[0, 0] = np.nan
        ds[3] = slab
    moempi("make-tokens", tokens, "-n", "30", "--hidden", "64")
    proc = mpirun(n, "run", "--model", model, "--tokens", tokens, "--output", out,
                  "--weights", "rank0", check=False, timeout=60)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("moempi:")]
    assert len(lines) == 1 and "contains NaN or Inf" in lines[0], proc.stderr
    assert "layers/004/experts/w_in" in lines[0]
    assert names(tmp_path) == ["m.h5", "t.h5"]
