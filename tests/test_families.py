"""The real families against transformers: tiny random Mixtral, Qwen2-MoE, Qwen3-MoE and
DeepSeek-V3 models saved by transformers' own ``save_pretrained`` (per-expert and fused
layouts), converted with ``moempi convert``, then moempi's serial forward
(``moempi.model.forward``) and the float64 reference (tests/reference.py) compared with
transformers' modules applied as moempi's stack (docs/design.md §1): ``post_attention_layernorm``,
the layer's MLP/MoE block, the residual; the final ``norm``.

torch and transformers are test judges (``make test`` installs them); in CI (CI=true) their
absence fails these tests instead of skipping them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import moempi

if os.environ.get("CI"):
    import torch
    import transformers
else:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

import reference  # noqa: E402  (after the judges: reference imports h5py only)

from moempi.io.hdf5 import ModelReader, read_model_meta  # noqa: E402
from moempi.model import gating  # noqa: E402
from moempi.model.forward import forward  # noqa: E402
from moempi.model.shapes import ModelMeta  # noqa: E402

TOL = 1e-4          # relative L2, fp32 (docs/design.md §1)
N = 96              # tokens
COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
              vocab_size=16, rms_norm_eps=1e-6)


def _configs():
    T = transformers
    return {
        "mixtral": (T.MixtralForCausalLM, T.MixtralConfig(
            intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, **COMMON)),
        "qwen2_moe": (T.Qwen2MoeForCausalLM, T.Qwen2MoeConfig(
            intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=False,
            **COMMON)),
        "qwen3_moe": (T.Qwen3MoeForCausalLM, T.Qwen3MoeConfig(
            intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
            head_dim=16, norm_topk_prob=True, **COMMON)),
        "deepseek_v3": (T.DeepseekV3ForCausalLM, T.DeepseekV3Config(
            intermediate_size=48, moe_intermediate_size=16, n_routed_experts=16,
            num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=8, kv_lora_rank=8,
            qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, **COMMON)),
    }


def _randomise(model, seed: int) -> None:
    """Weights that make every part count: norms 1 + 0.1 N(0,1), routers N(0,1) 2/sqrt(H)
    (well separated scores), matrices N(0,1)/sqrt(fan_in), a nonzero correction bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point():
                continue
            z = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1 + 0.1 * z)
            elif "e_score_correction_bias" in name:
                p.copy_(0.05 * z)
            elif name.endswith("gate.weight"):
                p.copy_(z * 2 / p.shape[-1] ** 0.5)
            else:
                p.copy_(z / p.shape[-1] ** 0.5)


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    """family -> (transformers model, its folder per layout, tokens)."""
    torch.manual_seed(0)
    out = {}
    for i, (family, (cls, config)) in enumerate(_configs().items()):
        model = cls(config).float().eval()
        _randomise(model, seed=i)
        folders = {}
        for layout, original in (("per-expert", True), ("fused", False)):
            folder = tmp_path_factory.mktemp(f"{family}-{layout}")
            model.save_pretrained(folder, save_original_format=original)
            folders[layout] = folder
        x = np.random.default_rng(i).standard_normal((N, config.hidden_size)).astype(np.float32)
        out[family] = (model, folders, x)
    return out


def _transformers_stack(model, x: np.ndarray):
    """y `[N, H]` and each MoE layer's chosen experts (sorted sets) by transformers' modules."""
    with torch.no_grad():
        h = torch.from_numpy(x)[None]                  # [1, N, H]
        chosen = {}
        for l, layer in enumerate(model.model.layers):
            normed = layer.post_attention_layernorm(h)
            if hasattr(layer.mlp, "experts"):
                _, _, idx = layer.mlp.gate(normed)
                chosen[l] = np.sort(idx.numpy(), axis=1)
            h = h + layer.mlp(normed)
        return model.model.norm(h)[0].numpy(), chosen


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_converted_equals_transformers(judged, tmp_path, family, layout):
    model, folders, x = judged[family]
    out = tmp_path / "model.h5"
    moempi("convert", folders[layout], out, "--dtype", "fp32")
    want, chosen = _transformers_stack(model, x)

    meta = read_model_meta(str(out))
    routing = {}
    with ModelReader(str(out)) as r:
        got = forward(x, meta, (r.layer(meta, l) for l in range(meta.num_layers)),
                      r.read("final_norm"), routing=routing)
    ref_routing = {}
    ref = reference.forward_array(str(out), x, routing=ref_routing)

    err, ref_err = reference.rel_l2(got, want), reference.rel_l2(ref, want)
    print(f"{family} {layout}: moempi vs transformers {err:.2e}, float64 reference {ref_err:.2e}")
    assert err <= TOL and ref_err <= TOL
    assert set(routing) == set(chosen) == set(meta.moe_layers)
    for l in chosen:
        assert np.array_equal(np.sort(routing[l], axis=1), chosen[l]), f"layer {l}"
        assert np.array_equal(np.sort(ref_routing[l], axis=1), chosen[l]), f"layer {l}"
    if family == "deepseek_v3":     # the dense layer, the groups, the shared expert are there
        assert meta.num_dense_layers == 1 and meta.n_group == 4 and meta.shared_ffn_size == 16
        assert meta.has_score_bias and meta.routed_scaling_factor == 2.5
    if family == "qwen2_moe":
        assert meta.shared_expert_gate and meta.num_dense_layers == 1


def test_deepseek_router_equals_transformers():
    """DeepSeek-V3's grouped sigmoid router on many random tokens: the same experts and
    weights as transformers' ``DeepseekV3TopkRouter``, with a correction bias."""
    _, config = _configs()["deepseek_v3"]
    router = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(config)
    rng = np.random.default_rng(7)
    H, E = config.hidden_size, config.n_routed_experts
    gate = (rng.standard_normal((E, H)) * 2 / H**0.5).astype(np.float32)
    bias = (0.05 * rng.standard_normal(E)).astype(np.float32)
    h = rng.standard_normal((4000, H)).astype(np.float32)
    with torch.no_grad():
        router.weight.copy_(torch.from_numpy(gate))
        router.e_score_correction_bias.copy_(torch.from_numpy(bias))
        _, w_t, idx_t = router(torch.from_numpy(h))
    meta = ModelMeta(hidden_size=H, num_experts=E, top_k=4, router="sigmoid", n_group=4,
                     topk_group=2, routed_scaling_factor=2.5, num_layers=1, num_dense_layers=0)
    idx, w = gating.router(h, np.ascontiguousarray(gate.T), meta.validate(), bias)
    order_t = np.argsort(idx_t.numpy(), axis=1)
    order = np.argsort(idx, axis=1)
    assert np.array_equal(np.take_along_axis(idx, order, 1),
                          np.take_along_axis(idx_t.numpy(), order_t, 1))
    np.testing.assert_allclose(np.take_along_axis(w, order, 1),
                               np.take_along_axis(w_t.numpy(), order_t, 1), rtol=1e-5)
    # the load balancer's bias is the selection bias too: it moves the choice, not the weights
    shifted, _ = gating.router(h, np.ascontiguousarray(gate.T), meta, bias + 10.0 * (np.arange(E) == 3))
    assert (shifted == 3).any(axis=1).all()


def test_group_ties_go_to_lower_ids():
    """Equal group scores and equal expert scores: the lower group, then the lower expert."""
    scores = np.full((1, 8), 0.5, np.float32)
    idx, w = gating.route_grouped(scores, top_k=2, n_group=4, topk_group=2)
    assert idx.tolist() == [[0, 1]] and np.allclose(w, 0.5)
    idx, _ = gating.route_grouped(scores, top_k=3, n_group=4, topk_group=2)
    assert idx.tolist() == [[0, 1, 2]]          # groups 0 and 1 kept: experts 0..3
