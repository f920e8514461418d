"""Shared fixtures: small model/tokens files and an mpiexec launcher with a hard timeout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
MOEMPI = [sys.executable, "-m", "moempi"]
MPIEXEC = os.environ.get("MPIEXEC") or (str(BIN / "mpiexec") if (BIN / "mpiexec").exists()
                                        else shutil.which("mpiexec") or "mpiexec")
MPI_ENV = {
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE": "true",
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "1",
    "MPIR_CVAR_POLLS_BEFORE_YIELD": "1",
    "HYDRA_LAUNCHER": "fork",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MPIEXEC_TIMEOUT": "120",
}


def moempi(*args, cwd=None, timeout=60, check=True) -> subprocess.CompletedProcess:
    """Run the serial `moempi` CLI."""
    proc = subprocess.run([*MOEMPI, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **MPI_ENV})
    if check and proc.returncode:
        raise AssertionError(f"moempi {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def mpirun(n: int, *args, cwd=None, timeout=120, check=True, python=False,
           env=None) -> subprocess.CompletedProcess:
    """``mpiexec -n n moempi ARGS`` (or ``python ARGS`` with python=True), bounded in time."""
    exe = [sys.executable] if python else MOEMPI
    cmd = [MPIEXEC, "-n", str(n), *exe, *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **MPI_ENV, **(env or {})})
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc


def names(folder, settle: float = 5.0) -> list[str]:
    """The sorted names in ``folder`` once no temporary file (``.*.partial-*``) is left, or
    after ``settle`` seconds: a rank killed by the launcher leaves its removal to its guard
    process, a moment after the launcher returns."""
    deadline = time.monotonic() + settle
    while True:
        found = sorted(p.name for p in Path(folder).iterdir())
        if not any(".partial-" in n for n in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """Models and tokens shared by the multi-rank tests (and their float64 references)."""
    d = tmp_path_factory.mktemp("inputs")
    moempi("init-model", d / "e4.h5", "--preset", "tiny", "--seed", "1")
    moempi("init-model", d / "e16.h5", "--preset", "tiny", "--experts", "16", "--layers", "4",
           "--seed", "2")
    moempi("init-model", d / "e3.h5", "--preset", "tiny", "--experts", "3", "--seed", "3",
           "--activation", "gelu")
    moempi("init-model", d / "f32.h5", "--preset", "tiny", "--dtype", "float32", "--seed", "4",
           "--activation", "relu", "--no-final-norm")
    moempi("init-model", d / "deep.h5", "--preset", "small", "--hidden", "64", "--ffn", "32",
           "--dense-ffn", "64", "--seed", "8")
    moempi("make-tokens", d / "tok.h5", "-n", "300", "--hidden", "64", "--seed", "5")
    moempi("make-tokens", d / "tok_bf16.h5", "-n", "200", "--hidden", "64", "--seed", "6",
           "--dtype", "bfloat16")
    return d


_refs: dict = {}


def reference(model, tokens):
    """Cached float64 reference output."""
    from reference import forward
    key = (str(model), str(tokens))
    if key not in _refs:
        _refs[key] = forward(str(model), str(tokens))
    return _refs[key]
