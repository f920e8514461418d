"""The exchange's compiled local steps (moempi.model.fused) against numpy's: the same bits, and when a job takes them."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import mpirun

from moempi.model import fused


@pytest.fixture(scope="module")
def kernels():
    return fused.load()


def _values(rng, shape):
    """float32 values with every class the wire meets: normal, subnormal, ties, the largest
    finite values, infinities and NaN."""
    u = rng.integers(0, 2**32, int(np.prod(shape)), dtype=np.uint64).astype(np.uint32)
    special = np.array([0x00008000, 0x00018000, 0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x7F7F8000,
                        0xFF7F8000, 0x7F800000, 0xFF800000, 0x80000001, 0x7FC00000, 0xFFFFFFFF],
                       np.uint32)
    u[:len(special)] = special
    return u.view(np.float32).reshape(shape)


def test_gather_round_is_the_device_rule(kernels):
    """Packing on a BF16 wire in one pass: the integer rule of encode_bf16 bit for bit,
    NaN included (the numpy step, ml_dtypes' cast, keeps a NaN with another payload)."""
    from moempi.model.arrays import encode_bf16, round_bf16
    rng = np.random.default_rng(0)
    x = _values(rng, (300, 136))
    idx = rng.integers(0, len(x), 2 * len(x))
    want = np.empty(x.shape, np.uint16)
    encode_bf16(np, x, want)
    got = np.empty((len(idx), x.shape[1]), np.uint16)
    kernels.pack_bf16(x, idx, got)
    assert np.array_equal(got, want[idx])
    numpy_step = np.empty_like(got)
    round_bf16(x, numpy_step, idx, np.empty_like(want))
    finite = ~np.isnan(x[idx])
    assert np.array_equal(got[finite], numpy_step[finite])


@pytest.mark.parametrize("wire", ["fp32", "bf16"])
def test_weighted_sum_same_bits_as_numpy(kernels, wire):
    """``x += sum_k w * back[pos]`` in one pass gives numpy's bits, dropped pairs (-1) and
    three slots included."""
    from moempi.model.arrays import round_bf16, weighted_rows
    rng = np.random.default_rng(1)
    N, K, H = 203, 3, 72
    back = rng.standard_normal((N * K - 7, H), dtype=np.float32) * 3
    if wire == "bf16":
        bits = np.empty(back.shape, np.uint16)
        round_bf16(back, bits)
        back = bits
    pos = rng.permutation(N * K)[:N * K].reshape(N, K).astype(np.int64)
    pos[pos >= len(back)] = -1                     # 7 pairs dropped
    w = rng.random((N, K), dtype=np.float32)
    x = rng.standard_normal((N, H), dtype=np.float32)
    want, got = x.copy(), x.copy()
    weighted_rows(want, back, pos, w)
    kernels.weighted_sum(got, back, pos, w)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert not np.array_equal(got, x)


def test_auto_takes_them_only_when_they_repay_their_load():
    from moempi.runtime import tune
    small, record = tune.local_kernels("auto", False, 10**6)
    assert small is None and record["mode"] == "numpy"
    big, record = tune.local_kernels("auto", False, 10**11)
    assert big is not None and record["mode"] == "compiled" and record["load_seconds"] > 0
    on_gpu, record = tune.local_kernels("compiled", True, 10**11)
    assert on_gpu is None and record["mode"] == "numpy"
    forced, record = tune.local_kernels("numpy", False, 10**11)
    assert forced is None and record["reason"] == "pipeline.local_kernels"


@pytest.mark.parametrize("precision,dispatch", [("fp32", "node"), ("bf16", "direct")])
def test_run_compiled_equals_numpy_bit_for_bit(files, tmp_path, precision, dispatch):
    """A 2-rank job with the compiled local steps writes numpy's bits, micro-batches in
    flight, on the BF16 wire and through node dispatch's two stages; the choice is recorded."""
    import json
    outs = {}
    for mode in ("numpy", "compiled"):
        out = tmp_path / f"{mode}.h5"
        mpirun(2, "run", "--model", files / "e4.h5", "--tokens", files / "tok.h5",
               "--output", out, "--precision", precision, "--micro-batches", "2",
               "--set", f"pipeline.local_kernels={mode}", "--set", f"pipeline.dispatch={dispatch}")
        with h5py.File(out, "r") as f:
            outs[mode] = f["hidden"][()]
            assert json.loads(f.attrs["tuning"])["local_kernels"]["mode"] == mode
    assert np.array_equal(outs["numpy"].view(np.uint32), outs["compiled"].view(np.uint32))
