"""Serial unit tests of the pure parts: config, placement, gating, BF16 codec, HDF5 files."""

from __future__ import annotations

import h5py
import ml_dtypes
import numpy as np
import pytest

from moempi.io import hdf5
from moempi.io.config import build_config, parse_value
from moempi.errors import MoempiError
from moempi.model.gating import gate_probs, route
from moempi.runtime.pipeline import split_rows
from moempi.place.placement import Placement, assign_replicas, default_hosts
from moempi.model.shapes import PRESETS


# -- config ----------------------------------------------------------------------------
def test_config_overrides_and_types():
    cfg = build_config({"run": {"model": "m.h5", "tokens": "t.h5"}},
                       {"pipeline.micro_batches": parse_value("4"),
                        "balance.rate": parse_value("0.01"),
                        "run.output": parse_value("out.h5")}).validate()
    assert cfg.pipeline.micro_batches == 4 and cfg.balance.rate == 0.01
    assert cfg.run.output == "out.h5"


@pytest.mark.parametrize("data,overrides,message", [
    ({"runn": {}}, {}, "unknown section [runn]"),
    ({"run": {"modle": "x"}}, {}, "unknown key run.modle"),
    ({}, {"pipeline.overlap": 3}, "pipeline.overlap must be bool"),
    ({}, {"nosection": 1}, "expected section.key"),
])
def test_config_errors(data, overrides, message):
    with pytest.raises(MoempiError) as err:
        build_config(data, overrides)
    assert message in str(err.value)


def _message_texts():
    """Every string constant in moempi's source but docstrings, f-string pieces included:
    (file, line, text)."""
    import ast
    import pathlib
    import moempi
    for path in sorted(pathlib.Path(moempi.__file__).parent.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docs = {id(node.body[0].value) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
                and node.body and isinstance(node.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docs:
                yield path.name, node.lineno, node.value


def test_every_suggested_config_key_exists():
    """A message that names a config key (``section.key``, or ``x.y = value`` as advice)
    names one the configuration accepts."""
    import dataclasses
    import re
    from moempi.io.config import Config
    schema = {f.name: {g.name for g in dataclasses.fields(f.default_factory())}
              for f in dataclasses.fields(Config)}
    named = re.compile(r"\b([a-z_]+)\.([a-z_]+)\b(\s*=\s*(?:true|false|\d|\"))?")
    checked, wrong = 0, []
    for name, line, text in _message_texts():
        for m in named.finditer(text):
            section, key, advice = m.groups()
            if section in schema or advice:
                checked += 1
                if key not in schema.get(section, ()):
                    wrong.append(f"{name}:{line}: {section}.{key}")
    assert not wrong, wrong
    assert checked > 20                      # the scan does find the messages' keys


def test_config_requires_model_and_tokens():
    with pytest.raises(MoempiError, match="run.model is required"):
        build_config({}).validate()


# -- placement -------------------------------------------------------------------------
def test_default_hosts_rules():
    assert default_hosts(4, 4) == ((0,), (1,), (2,), (3,))
    assert default_hosts(3, 7) == ((0, 3, 6), (1, 4), (2, 5))      # replicas on spare ranks
    assert default_hosts(5, 2) == ((0,), (1,), (0,), (1,), (0,))     # packing


def test_placement_roundtrip_and_validation():
    p = Placement.default(4, 4, range(1, 3))
    q = Placement.from_dict(p.to_dict(), range(1, 3))
    assert q.hosts == p.hosts
    q.validate(4, 4)
    with pytest.raises(MoempiError, match="placement is for 4 ranks"):
        q.validate(3, 4)
    with pytest.raises(MoempiError, match="not a MoE layer"):
        Placement.from_dict({**p.to_dict(), "layers": {"0": [[0]] * 4}}, range(1, 3))


def test_assign_replicas_even_split():
    hosts = {0: ((0, 2), (1,))}
    p = Placement(3, 2, hosts)
    topk_idx = np.zeros((101, 1), dtype=np.int32)
    dest = assign_replicas(topk_idx, *p.replica_table(0, 0), home_rank=0)
    counts = np.bincount(dest.ravel(), minlength=3)
    assert counts[1] == 0 and abs(counts[0] - counts[2]) <= 1


def test_assign_replicas_prefers_home_node():
    p = Placement(4, 1, {0: ((0, 2),)}, gpus_per_node=2)
    topk_idx = np.zeros((10, 1), dtype=np.int32)
    assert (assign_replicas(topk_idx, *p.replica_table(0, 3), home_rank=3) == 2).all()
    assert (assign_replicas(topk_idx, *p.replica_table(0, 1), home_rank=1) == 0).all()


# -- gating ----------------------------------------------------------------------------
def test_route_ties_go_to_lower_expert_and_bias_only_selects():
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]], dtype=np.float32)
    idx, w = route(probs, 2, norm_topk_prob=False)
    assert idx.tolist() == [[0, 1], [3, 2]]
    bias = np.array([0, 0, 0, 1.0], dtype=np.float32)
    idx, w = route(probs, 2, bias, norm_topk_prob=False)
    assert idx[0].tolist() == [3, 0]
    assert np.allclose(w[0], [0.25, 0.25])            # weights from the unbiased probs
    idx, w = route(probs, 2, norm_topk_prob=True)
    assert np.allclose(w.sum(1), 1)


def test_gate_probs_is_softmax():
    rng = np.random.default_rng(0)
    h, g = rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32)
    logits = h.astype(np.float64) @ g
    ref = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert np.allclose(gate_probs(h, g), ref, atol=1e-6)


# -- BF16 and files --------------------------------------------------------------------
def test_bf16_codec_matches_ml_dtypes():
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32) * 100
    bits = hdf5.bf16_bits(x)
    assert bits.dtype == np.uint16
    assert np.array_equal(hdf5.bf16_decode(bits), x.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert np.array_equal(hdf5.bf16_decode(hdf5.bf16_bits(hdf5.bf16_decode(bits))),
                          hdf5.bf16_decode(bits))


def test_host_wire_rounding_is_the_device_rule():
    """The host's BF16 wire (ml_dtypes' cast) gives the device kernels' integer rounding bit
    for bit: ties to even, subnormals, the largest finite values and infinities; a NaN
    stays a NaN.  With indices it rounds the tokens once and gathers the bits."""
    from moempi.model.arrays import BF16, encode_bf16, round_bf16
    rng = np.random.default_rng(2)
    special = np.array([0x00008000, 0x00018000, 0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x7F7F8000,
                        0xFF7F8000, 0x7F800000, 0xFF800000, 0x80000001, 0x7FC00000, 0xFFFFFFFF],
                       np.uint32)
    u = np.concatenate([rng.integers(0, 2**32, 1 << 18, dtype=np.uint64).astype(np.uint32),
                        np.arange(1 << 16, dtype=np.uint32), special])
    x = u.view(np.float32).reshape(-1, 4)
    want, got = np.empty(x.shape, np.uint16), np.empty(x.shape, np.uint16)
    encode_bf16(np, x, want)
    round_bf16(x, got)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], want[~nan])
    assert np.isnan(got[nan].view(BF16).astype(np.float32)).all()
    idx = rng.integers(0, len(x), 3 * len(x))
    gathered = np.empty((len(idx), 4), np.uint16)
    round_bf16(x, gathered, idx, np.empty_like(got))
    assert np.array_equal(gathered, got[idx])


def test_model_file_layout(tmp_path):
    path = tmp_path / "m.h5"
    meta = PRESETS["tiny"].replace(num_experts=3)
    hdf5.write_model(str(path), meta, seed=0)
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "moempi-model" and f.attrs["version"] == 1
        w = f["layers/002/experts/w_in"]
        assert w.shape == (3, 64, 32) and w.dtype == np.uint16 and w.attrs["encoding"] == "bfloat16"
        assert w.chunks is None                   # contiguous: one expert's slab is one read
        assert f["layers/000/mlp/w_in"].shape == (64, 96)
    assert hdf5.read_model_meta(str(path)) == meta
    assert not list(tmp_path.glob(".*partial*"))


def test_model_meta_errors(tmp_path):
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(MoempiError, match="not a moempi model"):
        hdf5.read_model_meta(str(path))
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(MoempiError, match="not an HDF5 file"):
        hdf5.read_model_meta(str(path))


def test_tokens_are_seeded_and_chunked(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    hdf5.write_tokens(str(a), 5000, 16, seed=3)
    hdf5.write_tokens(str(b), 5000, 16, seed=3)
    assert np.array_equal(hdf5.read_tokens(str(a), 0, 5000), hdf5.read_tokens(str(b), 0, 5000))
    assert hdf5.tokens_shape(str(a)) == (5000, 16)
    with h5py.File(a, "r") as f:            # the file says what it is and how it was made
        assert (f.attrs["format"], f.attrs["version"], f.attrs["seed"]) == ("moempi-tokens", 1, 3)
        assert "default_rng" in f.attrs["generator"] and f["tokens"].attrs["dims"] == "token, hidden"


def test_split_rows_covers_everything():
    assert split_rows(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert split_rows(2, 4) == [(0, 0), (0, 1), (1, 1), (1, 2)]


def test_example_inputs_are_valid():
    from pathlib import Path

    from moempi.io.config import load_config
    from moempi.io.topology import load_topology
    root = Path(__file__).resolve().parent.parent / "input"
    for path in root.glob("*.toml"):
        if path.name.startswith("topology"):
            assert load_topology(str(path)).num_gpus >= 1
        else:
            load_config(str(path)).validate()


# -- expert GEMM chunks ------------------------------------------------------------------
def _chunked_experts(chunk: int, recv, experts):
    """``MicroBatch._experts`` on received rows ``recv`` (one local expert), with exchanges
    always in flight, so every piece the chunk allows is cut."""
    from types import SimpleNamespace
    from moempi.runtime.backend import HostBackend
    from moempi.runtime.pipeline import MicroBatch
    meta = SimpleNamespace(activation="silu")
    ctx = SimpleNamespace(weights=SimpleNamespace(meta=meta), backend=HostBackend(),
                          scheduler=SimpleNamespace(poll=lambda: True), chunk_rows=chunk)
    plan = SimpleNamespace(expert_slices=lambda: iter([(0, slice(0, len(recv)))]))
    ex = SimpleNamespace(output_buffer=lambda plan: None)
    mb = SimpleNamespace(ctx=ctx, xp=np, _compute=lambda *a: None)
    mb._mlp_in_pieces = lambda *args: MicroBatch._mlp_in_pieces(mb, *args)
    return MicroBatch._experts(mb, SimpleNamespace(experts=experts, index=0), plan, recv, ex)


@pytest.mark.parametrize("hidden,ffn", [(64, 32), (1024, 256)])
def test_expert_chunks_change_no_bit(hidden, ffn):
    """Chunks of the measured size (a multiple of the BLAS's row quantum, checked at
    start-up) give every row the whole GEMM's bits, with pieces cut at every chance.  A
    chunk off the quantum does not on this project's BLAS (OpenBLAS, Haswell kernels: 8
    rows), which is why the quantum is measured."""
    import os
    from mpi4py import MPI
    from types import SimpleNamespace
    from moempi.runtime import tune
    if os.environ.get("OPENBLAS_NUM_THREADS") != "1":
        pytest.skip("needs one BLAS thread, as make test sets (with more, OpenBLAS splits "
                    "rows between threads by size and no quantum holds: no chunks then)")
    # (a shared expert twice as wide: the chunk is checked on its shape too)
    meta = SimpleNamespace(hidden_size=hidden, moe_ffn_size=ffn, activation="silu",
                           shared_ffn_size=2 * ffn)
    chunk, quantum, _ = tune.chunk_rows(meta, MPI.COMM_SELF, given=1)
    assert quantum and chunk == quantum
    rng = np.random.default_rng(3)
    experts = {0: (rng.standard_normal((hidden, ffn), dtype=np.float32) / 8,
                   rng.standard_normal((ffn, hidden), dtype=np.float32) / 8)}
    recv = rng.standard_normal((10 * quantum + 7, hidden), dtype=np.float32)
    whole = _chunked_experts(0, recv, experts)
    for size in (quantum, 2 * quantum, tune.chunk_rows(meta, MPI.COMM_SELF)[0]):
        assert np.array_equal(_chunked_experts(size, recv, experts), whole), size
    off = [q for q in (4, 8, 16) if q % quantum]
    differs = [q for q in off if not np.array_equal(_chunked_experts(q, recv, experts), whole)]
    if not differs:
        pytest.skip("this BLAS computes rows alike in any piece: nothing to plant")
