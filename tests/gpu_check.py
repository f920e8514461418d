"""`make gpu-check`: every GPU check in one bounded run, ending in a short Markdown table.

First the go/no-go correctness table, then the speed table (each section bounded in
time; a failing one is reported and the next still runs):
  binding   `moempi info --backend B` on 4 ranks: MPI library, CUDA-awareness, rank -> GPU
  numerics  the device pieces alone: BF16 cast, wire bits, matmul, expert MLP, gating,
            index gather/scatter, pack/unpack
  exchange  tests/mpi_dispatch.py on the device backend: row-exact round trip at 1, 2, 4 ranks
  width     a DeepSeek-V3-width model (H 7168, F 2048, 8 experts, 1 dense + 2 MoE layers) on
            1 and 4 ranks: relative L2 against the float64 reference (fp32 <= 1e-4, bf16
            within BF16_BOUND) and the forward time
  bench     `moempi bench gpu` on 4 ranks: expert MLP vs plain BF16 matmul, the 61-layer
            forward's tokens/s vs its compute floor, the OSU overlap %
  tests     pytest tests/test_gpu.py with only backend B

    python tests/gpu_check.py --out work [--backend cupy] [--quick]

``--backend standin --quick`` runs the same script without a GPU (how it is tested here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import MOEMPI, MPI_ENV, MPIEXEC  # noqa: E402
from reference import forward, rel_l2  # noqa: E402

# bf16 against float64 at DeepSeek-V3 width (BF16 expert GEMMs, intermediate and wire):
# measured 1.3e-2 on the stand-in (256 tokens, 1 and 4 ranks; median token 1.9e-3, the
# rest from the 0.4 % of tokens whose top-2 choice flips on a near tie), the arithmetic of
# cuBLAS up to summation order
BF16_BOUND = 3e-2


class Check:
    def __init__(self, out: Path, scratch: Path, budget_s: float):
        self.out, self.scratch, self.deadline = out, scratch, time.monotonic() + budget_s
        self.rows: list[str] = []
        self.log = open(out / "gpu-check.log", "w")

    def run(self, cmd, limit_s: float, env=None) -> subprocess.CompletedProcess | None:
        """``cmd`` within ``limit_s`` (and the whole check's deadline); its output into the log."""
        limit = min(limit_s, self.deadline - time.monotonic())
        self.say(f"$ {' '.join(map(str, cmd))}")
        if limit < 5:
            self.say("  (skipped: the check's time is spent)")
            return None
        try:
            proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True,
                                  timeout=limit, env={**os.environ, **MPI_ENV,
                                                      "MPIEXEC_TIMEOUT": str(int(limit)),
                                                      **(env or {})})
        except subprocess.TimeoutExpired as exc:    # its output may come back as bytes
            text = "".join(o.decode(errors="replace") if isinstance(o, bytes) else o
                           for o in (exc.stdout or "", exc.stderr or ""))
            self.say(f"  TIMEOUT after {limit:.0f} s\n{text}")
            return None
        self.say(proc.stdout + proc.stderr + f"  (exit {proc.returncode})")
        return proc

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def row(self, *cells) -> None:
        self.rows.append("| " + " | ".join(map(str, cells)) + " |")
        self.say(self.rows[-1])


def binding(c: Check, backend: str) -> None:
    proc = c.run([MPIEXEC, "-n", 4, *MOEMPI, "info", "--backend", backend], 90)
    if proc is None or proc.returncode:
        c.row("binding", "FAILED", "see gpu-check.log")
        return
    lines = [l.strip() for l in proc.stdout.splitlines() if l.strip().startswith("rank ")]
    facts = [l.strip() for l in proc.stdout.splitlines()
             if l.strip().startswith(("mpi:", "cuda-aware:"))]
    c.row("binding", f"{len(lines)} ranks", "; ".join([*facts, *lines[:2]]))


def numerics(c: Check, backend: str, quick: bool) -> None:
    """The BF16 pieces alone, in this process, against numpy/ml_dtypes and float64."""
    import ml_dtypes
    from moempi.runtime import cupy_standin
    from moempi.model.arrays import encode_bf16
    from moempi.runtime.backend import DeviceBackend
    from moempi.model.experts import mlp
    cp = cupy_standin if backend == "standin" else __import__("cupy")
    dev = DeviceBackend(cp, 0, cuda_aware=False, name=backend)
    with dev.running():          # every kernel on the backend's stream, as in the forward
        bf16 = ml_dtypes.bfloat16
        rows, H, F = (64, 256, 128) if quick else (512, 7168, 2048)
        rng = np.random.default_rng(0)
        h = rng.standard_normal((rows, H)).astype(np.float32)
        w_in = (rng.standard_normal((H, F)) * H**-0.5).astype(bf16)
        w_out = (rng.standard_normal((F, H)) * F**-0.5).astype(bf16)
        hd = dev.to_device(h)
        cast = dev.to_host(hd.astype(bf16).astype(cp.float32))
        c.row("numerics", "float32 -> bf16 cast", f"{np.mean(cast == h.astype(bf16).astype(np.float32)):.4f} "
              "of elements equal to ml_dtypes' rounding")
        wire = cp.empty((rows, H), dtype=cp.uint16)
        encode_bf16(cp, hd, wire)
        c.row("numerics", "wire encoding", f"{np.mean(dev.to_host(wire) == h.astype(bf16).view(np.uint16)):.4f}"
              " of elements equal to ml_dtypes' bits")
        a64, w64 = h.astype(bf16).astype(np.float64), w_in.astype(np.float64)
        prod = dev.to_host((hd.astype(bf16) @ dev.to_device(w_in, bf16)).astype(cp.float32))
        c.row("numerics", f"bf16 matmul {rows}x{H}x{F}", f"rel L2 {rel_l2(prod, a64 @ w64):.1e} against "
              "float64 of the same bf16 inputs")
        y = dev.to_host(mlp(hd, dev.to_device(w_in, bf16), dev.to_device(w_out, bf16), "silu"))
        z = h.astype(np.float64) @ w64
        ref = (z / (1 + np.exp(-z))) @ w_out.astype(np.float64)
        c.row("numerics", "expert MLP, bf16 weights", f"rel L2 {rel_l2(y, ref):.1e} against float64")
        yb = dev.to_host(dev.mlp(hd.astype(bf16), dev.to_device(w_in, bf16), dev.to_device(w_out, bf16),
                                 "silu")).astype(np.float32)
        c.row("numerics", "expert MLP, BF16 in and out, fused activation",
              f"rel L2 {rel_l2(yb, ref):.1e} against float64")
        from moempi.model.gating import gate_probs, route
        gate = (rng.standard_normal((H, 8)) * 2 * H**-0.5).astype(np.float32)
        probs = gate_probs(h, gate)
        want_idx, _ = route(probs, 2)
        got_idx, _ = route(gate_probs(hd, dev.to_device(gate)), 2)
        got_idx = dev.to_host(got_idx)
        c.row("numerics", "gate + top-2 on the device", f"{np.mean(got_idx == want_idx):.4f} of choices "
              f"equal to numpy's; dtype {got_idx.dtype}, range {got_idx.min()}..{got_idx.max()}")
        part = np.sort(rng.permutation(rows)[: rows // 3])
        y = dev.xp.zeros((rows, H), dtype=dev.xp.float32)
        y[dev.index(part)] = hd[dev.index(part)] * 2
        want = np.zeros((rows, H), np.float32)
        want[part] = h[part] * 2
        c.row("numerics", "gather/scatter by index array", "exact" if np.array_equal(dev.to_host(y), want)
              else "DIFFERS")
        idx = rng.permutation(rows)[: rows // 2]
        for wire_bf16 in (False, True):
            out = dev.empty((len(idx), H), np.uint16 if wire_bf16 else np.float32)
            dev.pack(hd, dev.index(idx), out, wire_bf16).wait()
            back = dev.to_host(dev.unpack(out, wire_bf16))
            want = h[idx].astype(bf16).astype(np.float32) if wire_bf16 else h[idx]
            c.row("numerics", f"pack + unpack ({'bf16' if wire_bf16 else 'fp32'} wire)",
                  "exact" if np.array_equal(back, want) else f"DIFFERS: rel L2 {rel_l2(back, want):.1e}")


def exchange(c: Check, backend: str, quick: bool) -> None:
    """tests/mpi_dispatch.py on the device backend: row-exact dispatch/combine with growing
    buffers, fp32 and bf16, overlapped and blocking, at 1, 2 and 4 ranks."""
    hidden, tokens = (16, 200) if quick else (1024, 3000)
    for n in (1, 2, 4):
        proc = c.run([MPIEXEC, "-n", n, sys.executable, HERE / "mpi_dispatch.py", backend, hidden,
                      tokens], 60)
        ok = proc is not None and proc.returncode == 0
        why = "" if ok or proc is None else \
            next((l for l in proc.stderr.splitlines() if l.startswith("rank ")), "")
        c.row("exchange", f"round trip, {n} ranks", "ok" if ok else f"FAILED {why}")


def tests(c: Check, backend: str) -> None:
    proc = c.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                  str(HERE / "test_gpu.py")], 240, env={"MOEMPI_TEST_BACKENDS": backend})
    summary = proc.stdout.strip().splitlines()[-1] if proc and proc.stdout.strip() else "no result"
    c.row("tests/test_gpu.py", "ok" if proc and proc.returncode == 0 else "FAILED", summary)


def width(c: Check, backend: str, quick: bool, tokens: int = 2048) -> None:
    d = c.scratch / "width"
    d.mkdir(parents=True, exist_ok=True)
    H, F, N = (256, 128, 256) if quick else (7168, 2048, tokens)
    model, tokens = d / "model.h5", d / "tokens.h5"
    made = c.run([*MOEMPI, "init-model", model, "--hidden", H, "--ffn", F, "--dense-ffn", 2 * F,
                  "--experts", 8, "--layers", 3, "--dense-layers", 1, "--seed", 11, "--overwrite"],
                 120)
    made = made and c.run([*MOEMPI, "make-tokens", tokens, "-n", N, "--hidden", H, "--seed", 12,
                           "--overwrite"], 60)
    if not made or made.returncode:
        c.row("width", "FAILED", "could not write the model")
        return
    t = time.perf_counter()
    ref = forward(str(model), str(tokens))
    c.say(f"float64 reference: {time.perf_counter() - t:.1f} s")
    cases = [(1, backend, "fp32", True), (4, backend, "fp32", True), (4, backend, "fp32", False),
             (1, backend, "bf16", True), (4, backend, "bf16", True)]
    for ranks, name, precision, overlap in cases:
        out = d / f"{name}-{ranks}-{precision}-{int(overlap)}.h5"
        threads = str(max(1, (os.cpu_count() or 4) // 4))
        proc = c.run([MPIEXEC, "-n", ranks, *MOEMPI, "run", "--model", model, "--tokens", tokens,
                      "-o", out, "--overwrite", "--precision", precision,
                      "--overlap" if overlap else "--no-overlap", "--set",
                      f"backend.name={name}", "--set",
                      f"backend.unverified_gpu={'true' if name == 'cupy' else 'false'}"], 150,
                     env={"OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads})
        what = f"{name} {precision} {'overlapped' if overlap else 'blocking'}"
        if proc is None or proc.returncode:
            c.row(f"width H{H} F{F}, {ranks} ranks", what, "FAILED")
            continue
        with h5py.File(out, "r") as f:
            y = f["hidden"][()]
            seconds = float(f.attrs["forward_seconds"])
            device = json.loads(f.attrs["devices"])[0]
        # per token too: a token whose top-k choice flips on a near tie (rounding decides
        # it) is off by O(1) and dominates the L2 norm; the median shows the arithmetic
        per_token = np.linalg.norm(y - ref, axis=1) / np.linalg.norm(ref, axis=1)
        err, bound = rel_l2(y, ref), (1e-4 if precision == "fp32" else BF16_BOUND)
        c.row(f"width H{H} F{F}, {ranks} ranks, {N} tokens", what,
              f"{'ok' if err <= bound else 'FAILED'}: rel L2 {err:.1e} (bound {bound:.0e}), "
              f"median token {np.median(per_token):.1e}, "
              f"{np.mean(per_token > 0.1):.1%} of tokens off > 10 %; forward "
              f"{seconds * 1e3:.0f} ms ({N / seconds:,.0f} tokens/s); {device}")


def bench(c: Check, backend: str, quick: bool) -> None:
    proc = c.run([MPIEXEC, "-n", 4, *MOEMPI, "bench", "gpu", "--backend", backend,
                  *(["--quick"] if quick else [])], 240)
    if proc is None or proc.returncode:
        c.row("bench gpu", "FAILED", "see gpu-check.log")
        return
    for line in proc.stdout.splitlines():
        if line.startswith("|") and "---" not in line and "| measure |" not in line:
            c.row("bench gpu", *line.strip("| ").split(" | "))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("work"), help="table and log go here")
    p.add_argument("--scratch", type=Path, help="model files of the width check [--out]")
    p.add_argument("--backend", default="cupy")
    p.add_argument("--quick", action="store_true", help="small shapes (for the stand-in)")
    p.add_argument("--budget", type=float, default=360, help="seconds for the whole check")
    p.add_argument("--tokens", type=int, default=2048, help="tokens of the width check")
    p.add_argument("--only", default="binding,numerics,exchange,width,bench,tests")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    c = Check(a.out, a.scratch or a.out, a.budget)
    c.say(f"mpiexec: {MPIEXEC}; python {sys.version.split()[0]}; numpy {np.__version__}")
    steps = {"binding": lambda: binding(c, a.backend), "tests": lambda: tests(c, a.backend),
             "numerics": lambda: numerics(c, a.backend, a.quick),
             "exchange": lambda: exchange(c, a.backend, a.quick),
             "width": lambda: width(c, a.backend, a.quick, a.tokens),
             "bench": lambda: bench(c, a.backend, a.quick)}
    for name in a.only.split(","):
        t = time.perf_counter()
        try:
            steps[name]()
        except Exception as exc:                      # report, and go on to the next check
            c.row(name, "FAILED", f"{type(exc).__name__}: {exc}")
        c.say(f"[{name}: {time.perf_counter() - t:.0f} s]")
        table = "\n".join(["| check | case | result | |", "|---|---|---|---|", *c.rows])
        (a.out / "gpu-check.md").write_text(table + "\n")     # after each: partial results stay
    print("\n" + table)
    return 1 if any("FAILED" in r for r in c.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
