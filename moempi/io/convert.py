"""`moempi convert`: a Mixtral, Qwen2-MoE, Qwen3-MoE or DeepSeek-V3 checkpoint (safetensors)
to a moempi model file (docs/design.md §2.1), one tensor at a time."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from moempi.errors import MoempiError
from moempi.io import hdf5
from moempi.io.hf_checkpoint import SCALE_SUFFIX, Checkpoint
from moempi.model.shapes import ModelMeta

FAMILIES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
            "DeepseekV3ForCausalLM")
# transformers' hidden_act -> moempi's activation (gelu is moempi's tanh form)
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu",
               "relu": "relu"}
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
OUT_DTYPES = {"bf16": hdf5.BF16, "fp32": "float32"}


@dataclass(frozen=True)
class Family:
    """How one family names its MoE parts (under ``model.layers.{l}.``)."""

    moe: str                 # the MoE block's module
    expert: tuple            # per-expert names of (gate, up, down)
    shared: str = ""         # the shared expert's module ("" none)


def _family(arch: str, ckpt: Checkpoint) -> Family:
    if arch == "MixtralForCausalLM":
        # transformers < 5 and the published files say block_sparse_moe, transformers 5 mlp
        moe = "mlp" if any(".mlp.gate." in n for n in ckpt.entries) else "block_sparse_moe"
        return Family(moe, ("w1", "w3", "w2"))
    if arch == "DeepseekV3ForCausalLM":
        return Family("mlp", ("gate_proj", "up_proj", "down_proj"), "mlp.shared_experts")
    if arch == "Qwen2MoeForCausalLM":
        return Family("mlp", ("gate_proj", "up_proj", "down_proj"), "mlp.shared_expert")
    return Family("mlp", ("gate_proj", "up_proj", "down_proj"))


def source_meta(config: dict, where: str, layers: int | None = None) -> ModelMeta:
    """The :class:`ModelMeta` of a transformers ``config``, keeping the first ``layers``."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else config.get("model_type", "?")
    if arch not in FAMILIES:
        raise MoempiError(f"{where}: architecture {arch!r} is not supported (convert reads "
                          f"{', '.join(FAMILIES)})")

    def get(key, default=None):
        # one quantity, several spellings: published Qwen files say num_experts, transformers
        # 5 writes num_local_experts
        for k in EXPERT_KEYS if key in EXPERT_KEYS else (key,):
            if k in config:
                return config[k]
        if default is None:
            raise MoempiError(f"{where}: config.json has no {key!r} ({arch})")
        return default

    act = get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise MoempiError(f"{where}: hidden_act {act!r} is not supported (moempi computes "
                          f"{', '.join(sorted(ACTIVATIONS))})")
    L = int(get("num_hidden_layers"))
    keep = L if layers is None else layers
    if not 1 <= keep <= L:
        raise MoempiError(f"{where}: --layers {keep} is beyond the model's {L} layers")
    # every family: gated (SwiGLU) MLPs, RMSNorm, a final norm
    common = dict(hidden_size=int(get("hidden_size")), num_layers=keep,
                  activation=ACTIVATIONS[act], norm_eps=float(get("rms_norm_eps", 1e-6)),
                  expert_kind="gated", dense_kind="gated", has_final_norm=True)
    K = int(get("num_experts_per_tok"))
    if arch == "MixtralForCausalLM":
        meta = ModelMeta(**common, moe_ffn_size=int(get("intermediate_size")), dense_ffn_size=0,
                         num_dense_layers=0, num_experts=int(get("num_local_experts")), top_k=K,
                         norm_topk_prob=True)
    elif arch == "DeepseekV3ForCausalLM":
        for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
            if config.get(key, want) != want:
                raise MoempiError(f"{where}: {key} = {config[key]!r}: moempi computes "
                                  f"DeepSeek-V3's {want!r}")
        F = int(get("moe_intermediate_size"))
        meta = ModelMeta(**common, moe_ffn_size=F, dense_ffn_size=int(get("intermediate_size")),
                         num_dense_layers=min(int(get("first_k_dense_replace", 0)), keep),
                         num_experts=int(get("n_routed_experts")), top_k=K,
                         norm_topk_prob=bool(get("norm_topk_prob", True)), router="sigmoid",
                         n_group=int(get("n_group", 1)), topk_group=int(get("topk_group", 1)),
                         routed_scaling_factor=float(get("routed_scaling_factor", 1.0)),
                         shared_ffn_size=F * int(get("n_shared_experts", 0)),
                         has_score_bias=True)
    else:                                   # Qwen2-MoE, Qwen3-MoE
        step, only = int(get("decoder_sparse_step", 1)), set(get("mlp_only_layers", []))
        dense = [l for l in range(L) if l in only or (l + 1) % step]
        D = len([l for l in dense if l < keep])
        if dense[:D] != list(range(D)) or any(l < keep for l in dense[D:]):
            raise MoempiError(f"{where}: dense layers {dense} are not the first layers of the "
                              "stack (moempi's stack: dense layers first, then MoE)")
        shared = int(get("shared_expert_intermediate_size", 0)) \
            if arch == "Qwen2MoeForCausalLM" else 0
        meta = ModelMeta(**common, moe_ffn_size=int(get("moe_intermediate_size")),
                         dense_ffn_size=int(get("intermediate_size")), num_dense_layers=D,
                         num_experts=int(get("num_experts")), top_k=K,
                         norm_topk_prob=bool(get("norm_topk_prob", False)),
                         shared_ffn_size=shared, shared_expert_gate=shared > 0)
    return meta.validate(where)


def _linear(ckpt, name, out_features, in_features):
    """A linear layer's ``[out, in]`` weight, checked, for a ``[in, out]`` dataset."""
    ckpt.check(name, (out_features, in_features))
    return lambda: ckpt.read(name).T


def plan(ckpt: Checkpoint, meta: ModelMeta, arch: str) -> dict:
    """Every dataset of the model file -> a function reading its float32 value (a 3-D
    dataset: a list of one function per expert); every source tensor checked (name, shape,
    dtype, FP8 scale) before anything is read or written."""
    fam = _family(arch, ckpt)
    H, F, Fd, E, Fs = (meta.hidden_size, meta.moe_ffn_size, meta.dense_ffn_size,
                       meta.num_experts, meta.shared_ffn_size)
    out = {}
    for l in range(meta.num_layers):
        src, g = f"model.layers.{l}", f"layers/{l:03d}"
        ckpt.check(f"{src}.post_attention_layernorm.weight", (H,))
        out[f"{g}/norm"] = lambda n=f"{src}.post_attention_layernorm.weight": ckpt.read(n)
        if not meta.is_moe(l):
            for dst, name in (("w_gate", "gate_proj"), ("w_in", "up_proj")):
                out[f"{g}/mlp/{dst}"] = _linear(ckpt, f"{src}.mlp.{name}.weight", Fd, H)
            out[f"{g}/mlp/w_out"] = _linear(ckpt, f"{src}.mlp.down_proj.weight", H, Fd)
            continue
        moe = f"{src}.{fam.moe}"
        out[f"{g}/gate"] = _linear(ckpt, f"{moe}.gate.weight", E, H)
        out.update(_experts(ckpt, moe, g, fam, meta))
        if meta.has_score_bias:
            ckpt.check(f"{moe}.gate.e_score_correction_bias", (E,))
            out[f"{g}/{hdf5.SCORE_BIAS}"] = lambda n=f"{moe}.gate.e_score_correction_bias": \
                ckpt.read(n)
        if Fs:
            shared = f"{src}.{fam.shared}"
            out[f"{g}/shared/w_gate"] = _linear(ckpt, f"{shared}.gate_proj.weight", Fs, H)
            out[f"{g}/shared/w_in"] = _linear(ckpt, f"{shared}.up_proj.weight", Fs, H)
            out[f"{g}/shared/w_out"] = _linear(ckpt, f"{shared}.down_proj.weight", H, Fs)
        if meta.shared_expert_gate:
            out[f"{g}/shared_gate"] = _linear(ckpt, f"{src}.mlp.shared_expert_gate.weight", 1, H)
    ckpt.check("model.norm.weight", (H,))
    out["final_norm"] = lambda: ckpt.read("model.norm.weight")
    return out


def _experts(ckpt: Checkpoint, moe: str, g: str, fam: Family, meta: ModelMeta) -> dict:
    """The routed experts of one layer, per-expert tensors or fused ones, whichever the file
    holds.  transformers 5 fuses them as ``gate_up_proj`` `[E, 2F, H]` (gate rows first)
    and ``down_proj`` `[E, H, F]`, each expert ``[out, in]`` like a linear layer."""
    H, F, E = meta.hidden_size, meta.moe_ffn_size, meta.num_experts
    fused = f"{moe}.experts.gate_up_proj"
    if fused in ckpt:
        ckpt.check(fused, (E, 2 * F, H))
        ckpt.check(f"{moe}.experts.down_proj", (E, H, F))
        cache = {}

        def part(name, rows, e):
            # the fused tensor is read once per layer and matrix (the largest single tensor)
            if cache.get("name") != name:
                cache.clear()
                cache.update(name=name, data=ckpt.read(name))
            return cache["data"][e, rows].T

        return {f"{g}/experts/w_gate": [lambda e=e: part(fused, slice(0, F), e) for e in range(E)],
                f"{g}/experts/w_in": [lambda e=e: part(fused, slice(F, 2 * F), e) for e in range(E)],
                f"{g}/experts/w_out": [lambda e=e: part(f"{moe}.experts.down_proj", slice(None), e)
                                       for e in range(E)]}
    found = {int(m.group(1)) for n in ckpt.entries
             if (m := re.match(re.escape(f"{moe}.experts.") + r"(\d+)\.", n))}
    if found != set(range(E)):
        raise MoempiError(f"{ckpt.folder}: {moe}.experts holds {len(found)} expert(s) "
                          f"(ids {min(found, default='-')}..{max(found, default='-')}), the "
                          f"config says {E}")
    gate, up, down = fam.expert
    return {f"{g}/experts/w_gate": [_linear(ckpt, f"{moe}.experts.{e}.{gate}.weight", F, H)
                                    for e in range(E)],
            f"{g}/experts/w_in": [_linear(ckpt, f"{moe}.experts.{e}.{up}.weight", F, H)
                                  for e in range(E)],
            f"{g}/experts/w_out": [_linear(ckpt, f"{moe}.experts.{e}.{down}.weight", H, F)
                                   for e in range(E)]}


def unused(ckpt: Checkpoint, meta: ModelMeta, used: set) -> Counter:
    """The checkpoint's tensors convert leaves out, by kind (what it says it dropped)."""
    kinds = Counter()
    L = int(ckpt.config["num_hidden_layers"])
    for name in ckpt.entries:
        if name in used or name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in used:
            continue
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= L:
            kinds["multi-token-prediction layer"] += 1
        elif m and int(m.group(1)) >= meta.num_layers:
            kinds["layers beyond --layers"] += 1
        elif ".self_attn." in name or ".input_layernorm." in name:
            kinds["attention (and its input norm)"] += 1
        elif "embed_tokens" in name or name.startswith("lm_head"):
            kinds["embeddings and lm_head"] += 1
        else:
            kinds["other"] += 1
    return kinds


def convert(src: str, out: str, layers: int | None = None, dtype: str = "bf16",
            overwrite: bool = False, progress=None, say=print) -> ModelMeta:
    """Convert the model folder ``src`` to the model file ``out`` (written under a temporary
    name and published: complete or absent).  ``progress(done, total)`` after each dataset
    slab; ``say`` the summary lines.  Returns the written file's metadata."""
    ckpt = Checkpoint(src)
    arch = (ckpt.config.get("architectures") or ["?"])[0]
    meta = source_meta(ckpt.config, src, layers).replace(weight_dtype=OUT_DTYPES[dtype])
    sources = plan(ckpt, meta, arch)
    shapes = hdf5.model_shapes(meta)
    assert set(sources) == set(shapes), set(sources) ^ set(shapes)
    used = {n for n in ckpt.entries if _used(n, meta)}
    total = sum(len(v) if isinstance(v, list) else 1 for v in sources.values())
    done = 0
    with hdf5.write_atomically(out, overwrite) as f:
        hdf5.write_model_attrs(f, meta)
        f.attrs["source_family"] = arch
        f.attrs["source_config"] = json.dumps(ckpt.config, sort_keys=True)
        f.attrs["source_checkpoint"] = json.dumps(ckpt.identity)
        for name, shape in shapes.items():
            # the correction bias stays float32: it separates scores closer than BF16 can
            kind = "float32" if name.endswith(hdf5.SCORE_BIAS) else meta.weight_dtype
            ds = hdf5.create_weight(f, name, shape, kind)
            readers = sources[name] if isinstance(sources[name], list) else [sources[name]]
            for e, read in enumerate(readers):
                value = hdf5.encode_weight(read(), kind)
                if len(shape) == 3:
                    ds[e] = value
                else:
                    ds[...] = value
                done += 1
                if progress:
                    progress(done, total)
    dropped = unused(ckpt, meta, used)
    say(f"converted {src} ({arch}) -> {out}: {meta.num_layers} layers ({meta.num_dense_layers} "
        f"dense), {meta.num_experts} experts of {meta.moe_ffn_size}, top-{meta.top_k}, "
        f"{meta.router} router" + (f", shared expert of {meta.shared_ffn_size}"
                                   if meta.shared_ffn_size else "") + f", {meta.weight_dtype}")
    say(f"kept: {len(used)} tensors (post-attention norms, routers, experts, dense and shared "
        "MLPs, final norm)")
    if dropped:
        say("not used (moempi's stack has no attention): "
            + ", ".join(f"{n} {kind}" for kind, n in sorted(dropped.items())))
    return meta


def _used(name: str, meta: ModelMeta) -> bool:
    """Whether the tensor ``name`` goes into the model file (its layer kept, its kind read)."""
    if name == "model.norm.weight":
        return True
    m = re.match(r"model\.layers\.(\d+)\.(.*)$", name)
    if not m or int(m.group(1)) >= meta.num_layers:
        return False
    rest = m.group(2)
    return rest == "post_attention_layernorm.weight" or (
        rest.startswith(("mlp.", "block_sparse_moe.")) and not rest.endswith(SCALE_SUFFIX))
