"""Serial tests: `plan`, `place` and the memory checks at DeepSeek-V3's full shape (256 gated
experts, top-8 in 4 of 8 groups, one shared expert, gated dense layers) on 16 to 256 GPUs."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from moempi.cli.place import place
from moempi.cli.plan import plan
from moempi.errors import MoempiError
from moempi.io.topology import Topology
from moempi.model.shapes import PRESETS
from moempi.perf.analytic import (Hardware, Layout, choose_micro_batches, expert_flops_per_pair,
                                  forward_time, pipeline_time, shared_flops_per_token)
from moempi.perf.memory import (WEIGHT_PARTS, check_fits, check_host_memory, memory_per_gpu,
                                smallest_fitting_tp)
from moempi.place.optimise import place_experts
from moempi.place.placement import Placement
from moempi.place.routing import REGIMES, synthetic_routing
from moempi.place.scoring import evaluate, predicted_layer_s

FULL = PRESETS["deepseek-v3-full"]
PLAIN = PRESETS["deepseek-v3"]
H, F, FD, FS, E = 7168, 2048, 18432, 2048, 256
SEED = Hardware.from_topology(Topology())
H200 = 141.0                                   # GB: what 16 GPUs need for the full model


def full_with(num_moe_layers: int):
    """The full shape cut to a few MoE layers: what placement tests can afford."""
    return FULL.replace(num_layers=FULL.num_dense_layers + num_moe_layers)


# -- memory -------------------------------------------------------------------------------
def test_gated_experts_dense_and_shared_weights_are_counted():
    assert FULL.expert_bytes == 3 * H * F * 2 == 88_080_384
    mem = memory_per_gpu(FULL, ep=256, tp=1, tokens_per_gpu=1, micro_batches=1)
    assert mem["experts"] == 58 * 88_080_384                  # one gated expert per layer
    assert mem["dense"] == 3 * 3 * H * FD * 2                  # three gated dense MLPs
    assert mem["shared"] == 58 * 3 * H * FS * 2                # the shared expert, whole, on every GPU
    assert mem["gate"] == 58 * (H * E * 2 + E * 4)             # gate + fp32 correction bias
    replicated = sum(mem[k] for k in WEIGHT_PARTS if k != "experts")
    assert replicated == FULL.replicated_weight_bytes
    # Qwen2-MoE's shared_gate [H, 1] per MoE layer
    qwen = FULL.replace(shared_expert_gate=True)
    assert memory_per_gpu(qwen, 256, 1, 1, 1)["gate"] - mem["gate"] == 58 * H * 2
    # the plain preset has none of it
    plain = memory_per_gpu(PLAIN, 256, 1, 1, 1)
    assert plain["shared"] == 0 and plain["experts"] == 58 * 2 * H * F * 2


@pytest.mark.parametrize("ep, per_slot", [(16, 16), (32, 8), (64, 4), (128, 2), (256, 1), (512, 1)])
def test_experts_packed_or_replicated_per_slot(ep, per_slot):
    mem = memory_per_gpu(FULL, ep, 1, 64, 1)
    assert mem["experts"] == 58 * per_slot * FULL.expert_bytes
    # what is not an expert does not depend on ep
    assert mem["shared"] == 58 * 3 * H * FS * 2 and mem["dense"] == 3 * 3 * H * FD * 2


def test_top8_and_shared_activations_in_the_buffers():
    T, m = 1024, 4
    full = memory_per_gpu(FULL, 64, 1, T, m)
    plain8 = memory_per_gpu(PLAIN.replace(top_k=8), 64, 1, T, m)
    plain2 = memory_per_gpu(PLAIN, 64, 1, T, m)
    assert full["exchange"] == 4 * T * 8 * H * 2 == 4 * plain2["exchange"]
    assert full["activations"] == T * (2 * H + E + H) * 4       # + the shared expert's output
    assert plain8["activations"] == plain2["activations"] == T * (2 * H + E) * 4
    # per micro-batch: gated experts' two intermediates, f32 outputs, the shared intermediate
    n = math.ceil(T / m)
    assert full["workspace"] == n * (8 * (2 * F + H) + 2 * FS) * 4
    assert plain8["workspace"] == n * 8 * (F + H) * 4
    assert full["total"] > plain8["total"] > plain2["total"]


def test_fit_check_and_host_check_count_the_full_shape():
    # 16 GPUs: 928 gated slabs (81.7 GB) + 7.7 GB replicated do not fit 64 GB; tp = 2 does
    with pytest.raises(MoempiError, match="tp=2 would fit"):
        check_fits(FULL, 16, 1, 4096, 16, 64e9)
    assert smallest_fitting_tp(FULL, 16, 4096, 16, 64e9) == 2
    assert check_fits(FULL, 16, 1, 4096, 16, H200 * 1e9)["total"] <= H200 * 1e9
    # a CPU rank holds its weights in float32: the shared experts are part of them
    no_shared = FULL.replace(shared_ffn_size=0)
    with_host = check_host_memory(FULL, 256, 8, 2, True, 1e15)
    assert with_host - check_host_memory(no_shared, 256, 8, 2, True, 1e15) == \
        58 * 3 * H * FS * 4 + 8 * H * 4 + 8 * 2 * FS * 4     # weights, output, intermediate
    with pytest.raises(MoempiError, match="host memory"):
        check_host_memory(FULL, 256, 8, 2, True, 10e9)


# -- time ---------------------------------------------------------------------------------
def test_flops_of_gated_and_shared_experts():
    assert expert_flops_per_pair(FULL) == 6 * H * F == 1.5 * expert_flops_per_pair(PLAIN)
    assert shared_flops_per_token(FULL) == 6 * H * FS
    assert shared_flops_per_token(PLAIN) == 0
    assert shared_flops_per_token(FULL.replace(shared_expert_gate=True)) == 6 * H * FS + 2 * H


def test_forward_time_counts_gated_top8_and_the_shared_expert():
    T = 4096
    fc = forward_time(FULL, SEED, Layout(ep=256, tokens_per_gpu=T, micro_batches=4))
    dense, moe = fc.layers[0], fc.moe_layers[0]
    R = SEED.gemm_flops
    assert dense.compute_s == pytest.approx(T * 2 * 3 * H * FD / R)
    assert moe.shared_s == pytest.approx(T * 6 * H * FS / R)
    assert moe.compute_s == pytest.approx(T * (8 * 6 * H * F + 6 * H * FS + 2 * H * E) / R)
    plain = forward_time(PLAIN, SEED, Layout(ep=256, tokens_per_gpu=T, micro_batches=4))
    assert moe.compute_s > 4 * plain.moe_layers[0].compute_s      # 4x the pairs, 1.5x per pair
    assert moe.dispatch_s == pytest.approx(4 * plain.moe_layers[0].dispatch_s)   # top-8 rows
    assert plain.moe_layers[0].shared_s == 0


def test_shared_expert_hides_behind_its_dispatch():
    lay = Layout(ep=64, tokens_per_gpu=2048, micro_batches=1)
    with_shared = forward_time(FULL, SEED, lay).moe_layers[0]
    without = forward_time(FULL.replace(shared_ffn_size=0), SEED, lay).moe_layers[0]
    s = with_shared.shared_s
    x_d = 2 * SEED.latency_s + with_shared.dispatch_s          # counts + dispatch phases
    assert 0 < s and with_shared.compute_s == pytest.approx(without.compute_s + s)
    # blocking pays it in full; overlapped, it runs while the dispatch is in flight
    assert with_shared.blocking_s == pytest.approx(without.blocking_s + s)
    assert with_shared.overlapped_s == pytest.approx(without.overlapped_s + max(0.0, s - x_d))
    # with several micro-batches the shared expert costs less than its compute
    lay4 = Layout(ep=64, tokens_per_gpu=2048, micro_batches=4)
    a = forward_time(FULL, SEED, lay4).moe_layers[0]
    b = forward_time(FULL.replace(shared_ffn_size=0), SEED, lay4).moe_layers[0]
    assert b.overlapped_s < a.overlapped_s < b.overlapped_s + a.shared_s
    # pipeline_time: no shared compute is the formula without it
    assert pipeline_time(2.0, 1.0, 0.1, 3, shared_s=0.0) == pipeline_time(2.0, 1.0, 0.1, 3)


def test_runner_micro_batch_choice_takes_the_full_shape():
    args = dict(tokens_per_rank=4096, num_ranks=256, gemm_flops=240e12, latency_s=1e-4,
                bandwidth_Bps=1.44e12 / 8, wire_bytes=2)
    m_full = choose_micro_batches(meta=FULL, **args)
    m_plain = choose_micro_batches(meta=PLAIN, **args)
    assert 1 <= m_plain <= m_full <= 16         # more compute per token hides more latency


def _sweep_rows(output: str) -> dict[int, list[str]]:
    rows = {}
    for line in output.splitlines():
        cells = line.split()
        if cells and cells[0].isdigit() and len(cells) == 14:
            rows[int(cells[0])] = cells
    return rows


def test_plan_sweep_over_ep_for_the_full_preset():
    runner = CliRunner()
    full = runner.invoke(plan, ["--preset", "deepseek-v3-full", "--sweep", "ep=16,32,64,128,256"],
                         catch_exceptions=False)
    assert full.exit_code == 0, full.output
    assert "256 gated experts, top-8 in 4 of 8 groups, 1 shared gated expert of 2048" in full.output
    rows = _sweep_rows(full.output)
    assert sorted(rows) == [16, 32, 64, 128, 256]
    mem = [float(rows[ep][12]) for ep in sorted(rows)]
    assert mem == sorted(mem, reverse=True)                    # fewer experts per GPU
    assert rows[16][13] == "tp=2" and rows[256][13] == "yes"    # 64 GB seed GPUs
    plain = _sweep_rows(runner.invoke(plan, ["--sweep", "ep=16,64,256"]).output)
    for ep in (16, 64, 256):
        compute, exchange = float(rows[ep][3]), float(rows[ep][4])
        assert compute > 6 * float(plain[ep][3])                 # 4x pairs x 1.5 + shared
        assert exchange > float(plain[ep][4])                    # 4x the rows on the wire
        assert float(rows[ep][10].replace(",", "")) < float(plain[ep][10].replace(",", ""))


def test_plan_single_forecast_reports_shared_expert_and_replicas():
    runner = CliRunner()
    out = runner.invoke(plan, ["--preset", "deepseek-v3-full", "--ep", "512", "--json", "-"],
                        catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "1 expert(s) per layer per slot (2 replica(s) of each expert)" in out.output
    assert "shared " in out.output and "while its dispatch is in flight" in out.output
    data = json.loads(out.output[out.output.index("\n{") + 1:])
    moe = [l for l in data["layers"] if l["kind"] == "moe"]
    assert len(moe) == 58 and all(l["shared_s"] > 0 for l in moe)
    assert data["memory_bytes"]["shared"] == 58 * 3 * H * FS * 2
    packed = runner.invoke(plan, ["--preset", "deepseek-v3-full", "--ep", "32"]).output
    assert "8 expert(s) per layer per slot" in packed
    assert "shared 5.11" in packed and "dense 2.38" in packed


# -- placement ------------------------------------------------------------------------------
@pytest.mark.parametrize("regime", REGIMES)
def test_synthetic_routing_is_top8_within_4_of_8_groups(regime):
    meta = full_with(1)
    r = synthetic_routing(regime, 32, meta, 16, seed=1, gpus_per_node=8)
    idx = r.topk_idx[0]                                       # [N, 8]
    assert idx.shape == (32 * 16, 8) and idx.min() >= 0 and idx.max() < E
    assert all(len(set(row)) == 8 for row in idx.tolist())     # distinct experts
    groups = [len(set(g)) for g in (idx // (E // 8)).tolist()]
    assert max(groups) <= 4
    # without the group limit tokens spread wider: the check above can fail
    free = synthetic_routing(regime, 32, meta.replace(n_group=1, topk_group=1), 16, seed=1,
                             gpus_per_node=8)
    assert max(len(set(g)) for g in (free.topk_idx[0] // (E // 8)).tolist()) > 4


@pytest.mark.parametrize("nodes", [2, 4])
def test_place_packs_256_gated_experts(nodes):
    topo = Topology(nodes=nodes, gpus_per_node=8, gpu_memory_gb=H200)
    meta = full_with(1)
    routing = synthetic_routing("zipf", topo.num_gpus, meta, 16, gpus_per_node=8)
    with pytest.raises(MoempiError, match="--allow-packing"):
        place_experts(routing, topo, meta)
    placement = place_experts(routing, topo, meta, allow_packing=True)
    placement.validate(topo.num_gpus, E, allow_packing=True)
    hosts = placement.hosts[3]
    per_gpu = np.bincount([r for ranks in hosts for r in ranks], minlength=topo.num_gpus)
    assert (per_gpu == E // topo.num_gpus).all()               # E / GPUs experts each
    obj = placement.objective
    assert obj["max_gpu_memory_gb"] == round(E // topo.num_gpus * FULL.expert_bytes / 1e9, 3)
    for base in obj["baselines"].values():
        assert obj["max_inter_node_link_tokens"] <= base["max_inter_node_link_tokens"]


def test_place_one_gated_expert_per_gpu_and_replicas():
    topo = Topology(nodes=32, gpus_per_node=8)               # input/topology-32x8.toml
    meta = full_with(1)
    routing = synthetic_routing("uniform", 256, meta, 4, gpus_per_node=8)
    placement = place_experts(routing, topo, meta)
    assert sorted(len(r) for r in placement.hosts[3]) == [1] * E
    # more GPUs than experts: the spare GPUs hold replicas
    small = meta.replace(num_experts=64)                      # 8 groups of 8, top-8 in 4
    r16 = synthetic_routing("zipf", 128, small, 8, gpus_per_node=8)
    spread = place_experts(r16, Topology(nodes=16, gpus_per_node=8), small)
    counts = [len(r) for r in spread.hosts[3]]
    assert sum(counts) == 128 and max(counts) > 1


def test_place_memory_check_counts_gated_slabs_and_replicated_weights():
    routing = synthetic_routing("uniform", 16, FULL, 1, gpus_per_node=8)
    expected = (r"memory: each GPU must hold up to 928 expert slabs \(81\.74 GB\) and 7\.70 GB "
                r"of replicated weights")
    with pytest.raises(MoempiError, match=expected):
        place_experts(routing, Topology(nodes=2, gpus_per_node=8), FULL, allow_packing=True)
    # 80 GB holds the slabs alone (81.74 GB does not) but not with the replicated weights
    with pytest.raises(MoempiError, match="replicated"):
        place_experts(routing, Topology(nodes=2, gpus_per_node=8, gpu_memory_gb=85.0), FULL,
                      allow_packing=True)


def test_predicted_layer_time_counts_gated_rows_and_the_shared_expert():
    topo = Topology()
    plain = predicted_layer_s(1000, 0, FULL.replace(expert_kind="plain", shared_ffn_size=0), topo)
    gated = predicted_layer_s(1000, 0, FULL.replace(shared_ffn_size=0), topo)
    assert gated == pytest.approx(1.5 * plain)
    shared = predicted_layer_s(1000, 0, FULL, topo, home_tokens=125)
    assert shared == pytest.approx(gated * (1000 + 125) / 1000)


def test_command_place_full_preset(tmp_path):
    runner = CliRunner()
    topo = tmp_path / "t.toml"
    topo.write_text("[topology]\nnodes = 32\ngpus_per_node = 8\n")
    contiguous = Placement.default(E, 256, FULL.moe_layers, 8)
    path = str(tmp_path / "p.json")
    contiguous.save(path)
    out = runner.invoke(place, ["--topology", str(topo), "--preset", "deepseek-v3-full",
                                "--synthetic", "locality", "--tokens-per-rank", "2",
                                "--evaluate", path], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "(512 tokens, 58 MoE layers)" in out.output
    line = next(l for l in out.output.splitlines() if l.startswith("max_gpu_memory_gb"))
    assert line.split()[1] == f"{round(58 * FULL.expert_bytes / 1e9, 3):g}"   # 5.109 GB: gated slabs
    small = tmp_path / "small.toml"
    small.write_text("[topology]\nnodes = 2\ngpus_per_node = 8\n")
    refused = runner.invoke(place, ["--topology", str(small), "--preset", "deepseek-v3-full",
                                    "--synthetic", "uniform", "--tokens-per-rank", "1"])
    assert refused.exit_code == 1 and "--allow-packing" in refused.output
