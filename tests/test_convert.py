"""`moempi convert` on hand-made checkpoints (safetensors written here with numpy, no torch):
both expert layouts, shards with an index, FP8 with block scales, the multi-token-prediction
layer, and each bad input refused in one line with nothing written (docs/design.md §4)."""

from __future__ import annotations

import json
import struct

import h5py
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import reference
from conftest import moempi, mpirun, names

from moempi.errors import MoempiError
from moempi.io import hdf5
from moempi.io.convert import convert
from moempi.io.hdf5 import ModelReader, read_model_meta
from moempi.model.forward import forward

H, F, FD, E, L = 16, 8, 24, 8, 2          # one dense layer, one MoE layer
CONFIG = {"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": H, "num_hidden_layers": L,
          "first_k_dense_replace": 1, "intermediate_size": FD, "moe_intermediate_size": F,
          "n_routed_experts": E, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
          "n_shared_experts": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
          "rms_norm_eps": 1e-6, "hidden_act": "silu"}


def tensors(fused: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """A DeepSeek-V3-shaped checkpoint's tensors, ``[out, in]`` as transformers stores them,
    with an attention tensor and a multi-token-prediction layer (index L) that convert skips."""
    rng = np.random.default_rng(seed)

    def m(*shape):
        return (rng.standard_normal(shape) / shape[-1] ** 0.5).astype(np.float32)

    t = {"model.embed_tokens.weight": m(4, H), "model.norm.weight": 1 + m(H),
         "model.layers.0.post_attention_layernorm.weight": 1 + m(H),
         "model.layers.0.self_attn.q_proj.weight": m(H, H),
         "model.layers.0.mlp.gate_proj.weight": m(FD, H),
         "model.layers.0.mlp.up_proj.weight": m(FD, H),
         "model.layers.0.mlp.down_proj.weight": m(H, FD),
         "model.layers.1.post_attention_layernorm.weight": 1 + m(H),
         "model.layers.1.mlp.gate.weight": 4 * m(E, H),
         "model.layers.1.mlp.gate.e_score_correction_bias": 0.05 * m(E),
         "model.layers.2.mlp.gate.weight": m(E, H)}                 # the MTP layer
    for name, shape in (("gate_proj", (F, H)), ("up_proj", (F, H)), ("down_proj", (H, F))):
        t[f"model.layers.1.mlp.shared_experts.{name}.weight"] = m(*shape)
    experts = {name: [m(*shape) for _ in range(E)]
               for name, shape in (("gate_proj", (F, H)), ("up_proj", (F, H)), ("down_proj", (H, F)))}
    if fused:
        t["model.layers.1.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([g, u]) for g, u in zip(experts["gate_proj"], experts["up_proj"])])
        t["model.layers.1.mlp.experts.down_proj"] = np.stack(experts["down_proj"])
    else:
        for name, mats in experts.items():
            for e, w in enumerate(mats):
                t[f"model.layers.1.mlp.experts.{e}.{name}.weight"] = w
    return t


def folder(path, t: dict, config: dict | None = None, shards: int = 1):
    """Write ``t`` as a model folder: one model.safetensors, or ``shards`` files + index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or CONFIG))
    if shards == 1:
        save_file(t, str(path / "model.safetensors"))
        return path
    names_ = sorted(t)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: t[n] for n in names_[i::shards]}
        save_file(part, str(path / shard))
        weight_map.update({n: shard for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def write_raw(path, t: dict[str, tuple[str, np.ndarray]]) -> None:
    """A safetensors file by hand (the format: u64 header length, JSON header, bytes), for
    dtypes safetensors' numpy writer has not (FP8)."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, a) in t.items():
        blob = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def datasets(path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, hdf5.read_f32(o))
                     if isinstance(o, h5py.Dataset) else None)
    return out


def quiet(*_):
    pass


def test_layouts_and_shards_give_the_same_file(tmp_path):
    t = tensors()
    plain = tmp_path / "plain.h5"
    convert(str(folder(tmp_path / "a", t)), str(plain), dtype="fp32", say=quiet)
    convert(str(folder(tmp_path / "b", tensors(fused=True))), str(tmp_path / "fused.h5"),
            dtype="fp32", say=quiet)
    convert(str(folder(tmp_path / "c", t, shards=3)), str(tmp_path / "sharded.h5"),
            dtype="fp32", say=quiet)
    got = datasets(plain)
    for other in ("fused.h5", "sharded.h5"):
        b = datasets(tmp_path / other)
        assert sorted(b) == sorted(got)
        for name in got:
            np.testing.assert_array_equal(got[name], b[name], err_msg=f"{other} {name}")
    # transposed to [in, out], gate and up in their places
    e = 5
    np.testing.assert_array_equal(got["layers/001/experts/w_gate"][e],
                                  t[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"].T)
    np.testing.assert_array_equal(got["layers/001/experts/w_in"][e],
                                  t[f"model.layers.1.mlp.experts.{e}.up_proj.weight"].T)
    np.testing.assert_array_equal(got["layers/001/experts/w_out"][e],
                                  t[f"model.layers.1.mlp.experts.{e}.down_proj.weight"].T)
    np.testing.assert_array_equal(got["layers/000/norm"],
                                  t["model.layers.0.post_attention_layernorm.weight"])
    with h5py.File(plain, "r") as f:
        assert f.attrs["source_family"] == "DeepseekV3ForCausalLM"
        assert json.loads(f.attrs["source_config"])["n_group"] == 2
        ident = json.loads(f.attrs["source_checkpoint"])
        assert ident["files"][0]["name"] == "model.safetensors"
        assert len(ident["sha256_index_and_headers"]) == 64
        assert "layers/002" not in f                       # the MTP layer skipped
    # the converted file runs through moempi's forward and the reference alike
    meta = read_model_meta(str(plain))
    x = np.random.default_rng(1).standard_normal((40, H)).astype(np.float32)
    with ModelReader(str(plain)) as r:
        y = forward(x, meta, (r.layer(meta, l) for l in range(L)), r.read("final_norm"))
    assert reference.rel_l2(y, reference.forward_array(str(plain), x)) <= 1e-5


def test_bf16_is_the_rounded_fp32(tmp_path):
    src = str(folder(tmp_path / "a", tensors()))
    convert(src, str(tmp_path / "f.h5"), dtype="fp32", say=quiet)
    convert(src, str(tmp_path / "b.h5"), dtype="bf16", say=quiet)
    f32, b16 = datasets(tmp_path / "f.h5"), datasets(tmp_path / "b.h5")
    for name in f32:
        want = f32[name] if name.endswith(hdf5.SCORE_BIAS) else \
            f32[name].astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(b16[name], want, err_msg=name)


def test_fp8_block_scales(tmp_path):
    """FP8 weights with ``weight_scale_inv`` per block (8 x 8 here, from the config's
    ``quantization_config``; 128 x 128 by default), dequantised block by block."""
    rng = np.random.default_rng(3)
    t = tensors()
    raw = {}
    for name, a in t.items():
        if a.ndim == 2 and "mlp" in name and "gate.weight" not in name:
            q = a.astype(ml_dtypes.float8_e4m3fn)
            scale = rng.uniform(0.5, 2.0, (-(-a.shape[0] // 8), -(-a.shape[1] // 8)))
            raw[name] = ("F8_E4M3", q)
            raw[name + "_scale_inv"] = ("F32", scale.astype(np.float32))
            t[name] = q.astype(np.float32) * np.repeat(np.repeat(scale, 8, 0), 8, 1)[
                :a.shape[0], :a.shape[1]]
        else:
            raw[name] = ("F32", a)
    config = {**CONFIG, "quantization_config": {"quant_method": "fp8", "weight_block_size": [8, 8]}}
    src = tmp_path / "fp8"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    write_raw(src / "model.safetensors", raw)
    convert(str(src), str(tmp_path / "fp8.h5"), dtype="fp32", say=quiet)
    got = datasets(tmp_path / "fp8.h5")
    np.testing.assert_allclose(got["layers/000/mlp/w_in"], t["model.layers.0.mlp.up_proj.weight"].T,
                               rtol=1e-6)
    np.testing.assert_allclose(got["layers/001/experts/w_out"][3],
                               t["model.layers.1.mlp.experts.3.down_proj.weight"].T, rtol=1e-6)
    # a missing scale is refused
    del raw["model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"]
    write_raw(src / "model.safetensors", raw)
    with pytest.raises(MoempiError, match="has no scale .*experts.3.down_proj.weight_scale_inv"):
        convert(str(src), str(tmp_path / "x.h5"), say=quiet)
    assert not (tmp_path / "x.h5").exists()


def test_layers_and_summary(tmp_path):
    src = str(folder(tmp_path / "a", tensors()))
    lines = []
    meta = convert(src, str(tmp_path / "one.h5"), layers=1, say=lines.append)
    assert meta.num_layers == 1 and meta.num_dense_layers == 1
    assert "not used (moempi's stack has no attention)" in lines[-1]
    assert "1 attention" in lines[-1] and "1 multi-token-prediction layer" in lines[-1]
    assert "layers beyond --layers" in lines[-1]


def _bad(tmp_path, t=None, config=None, **kw):
    return folder(tmp_path / "bad", t if t is not None else tensors(), config)


@pytest.mark.parametrize("case, match", [
    ("no config", "no config.json"),
    ("unknown architecture", "'LlamaForCausalLM' is not supported .*MixtralForCausalLM"),
    ("missing shard", "shard file not found"),
    ("truncated shard", "truncated safetensors file"),
    ("wrong shape", r"up_proj.weight has shape \[8, 15\], expected \[8, 16\]"),
    ("wrong dtype", "has dtype I32"),
    ("extra expert", "holds 9 expert"),
    ("fused expert count", r"gate_up_proj has shape \[7, 16, 16\]"),
    ("nan", "contains NaN or Inf"),
    ("layers beyond", "--layers 3 is beyond the model's 2 layers"),
])
def test_bad_input(tmp_path, case, match):
    """Each bad input: a MoempiError (one line, below), and nothing written."""
    t, layers = tensors(), None
    if case == "no config":
        src = _bad(tmp_path)
        (src / "config.json").unlink()
    elif case == "unknown architecture":
        src = _bad(tmp_path, config={**CONFIG, "architectures": ["LlamaForCausalLM"]})
    elif case in ("missing shard", "truncated shard"):
        src = folder(tmp_path / "bad", t, shards=2)
        shard = src / "model-00002-of-00002.safetensors"
        if case == "missing shard":
            shard.unlink()
        else:
            shard.write_bytes(shard.read_bytes()[:-10])
    elif case == "wrong shape":
        t["model.layers.1.mlp.experts.2.up_proj.weight"] = np.zeros((F, H - 1), np.float32)
        src = _bad(tmp_path, t)
    elif case == "wrong dtype":
        t["model.layers.1.mlp.experts.2.up_proj.weight"] = np.zeros((F, H), np.int32)
        src = _bad(tmp_path, t)
    elif case == "extra expert":
        for name in ("gate_proj", "up_proj", "down_proj"):
            t[f"model.layers.1.mlp.experts.{E}.{name}.weight"] = \
                t[f"model.layers.1.mlp.experts.0.{name}.weight"]
        src = _bad(tmp_path, t)
    elif case == "fused expert count":
        t = tensors(fused=True)
        t["model.layers.1.mlp.experts.gate_up_proj"] = t["model.layers.1.mlp.experts.gate_up_proj"][:-1]
        src = _bad(tmp_path, t)
    elif case == "nan":
        t["model.layers.1.mlp.experts.6.down_proj.weight"][2, 3] = np.nan
        src = _bad(tmp_path, t)
    else:
        src, layers = _bad(tmp_path), 3
    out = tmp_path / "out" / "model.h5"
    out.parent.mkdir()
    with pytest.raises(MoempiError, match=match) as info:
        convert(str(src), str(out), layers=layers, say=quiet)
    assert "\n" not in str(info.value)
    assert names(out.parent) == []


def test_cli_one_line_and_nothing_written(tmp_path):
    src = _bad(tmp_path, config={**CONFIG, "architectures": ["GPT2LMHeadModel"]})
    proc = moempi("convert", src, tmp_path / "m.h5", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("moempi: error: ")
    assert "GPT2LMHeadModel" in proc.stderr and not (tmp_path / "m.h5").exists()
    good = folder(tmp_path / "good", tensors())
    proc = moempi("convert", good, tmp_path / "m.h5")
    assert "kept:" in proc.stdout and "attention" in proc.stdout
    proc = moempi("convert", good, tmp_path / "m.h5", check=False)
    assert proc.returncode == 1 and "exists" in proc.stderr


def test_run_refuses_capacity_with_the_sigmoid_router(tmp_path):
    """Capacity (softmax only) on a converted sigmoid-routed model: one line at start-up, no
    output, rather than a wrong answer."""
    convert(str(folder(tmp_path / "a", tensors())), str(tmp_path / "m.h5"), say=quiet)
    moempi("make-tokens", tmp_path / "tok.h5", "-n", "8", "--hidden", H)
    proc = mpirun(1, "run", "--model", tmp_path / "m.h5", "--tokens", tmp_path / "tok.h5",
                  "--output", tmp_path / "out.h5", "--set", "balance.capacity_factor=1.5",
                  check=False)
    assert proc.returncode == 1
    assert "capacity is implemented for the unscaled softmax router only" in proc.stderr
    assert not (tmp_path / "out.h5").exists()


def test_init_model_full_preset(tmp_path):
    """`init-model --preset deepseek-v3-full` at small width: every part of the family
    written, read back with its metadata, and moempi's forward equal to the reference."""
    path = tmp_path / "ds.h5"
    moempi("init-model", path, "--preset", "deepseek-v3-full", "--layers", "4", "--hidden", "32",
           "--ffn", "8", "--dense-ffn", "16", "--experts", "16", "--dtype", "float32")
    meta = read_model_meta(str(path))
    assert (meta.num_dense_layers, meta.top_k, meta.n_group, meta.topk_group) == (3, 8, 8, 4)
    assert meta.expert_kind == meta.dense_kind == "gated" and meta.router == "sigmoid"
    # the shared expert follows --ffn (DeepSeek-V3's is one expert wide) unless given
    assert meta.shared_ffn_size == 8 and meta.has_score_bias and meta.routed_scaling_factor == 2.5
    other = tmp_path / "ds2.h5"
    moempi("init-model", other, "--preset", "deepseek-v3-full", "--layers", "4", "--hidden", "32",
           "--ffn", "8", "--shared-ffn", "0", "--experts", "16", "--dtype", "float32")
    assert read_model_meta(str(other)).shared_ffn_size == 0
    with h5py.File(path, "r") as f:
        hdf5.check_datasets(f, meta, str(path))
    x = np.random.default_rng(2).standard_normal((50, 32)).astype(np.float32)
    with ModelReader(str(path)) as r:
        y = forward(x, meta, (r.layer(meta, l) for l in range(4)), r.read("final_norm"))
    assert reference.rel_l2(y, reference.forward_array(str(path), x)) <= 1e-4


def test_stray_dataset_refused(tmp_path):
    """A gated matrix in a file whose attributes say plain would be ignored: refused."""
    path = tmp_path / "m.h5"
    moempi("init-model", path, "--preset", "tiny", "--layers", "2")
    with h5py.File(path, "a") as f:
        f.create_dataset("layers/001/experts/w_gate", data=np.zeros((4, 64, 32), np.float32))
    meta = read_model_meta(str(path))
    with h5py.File(path, "r") as f, pytest.raises(MoempiError, match="w_gate is not used"):
        hdf5.check_datasets(f, meta, str(path))
