"""Serial tests of the performance and memory model (perf, memory) and `moempi plan`."""

import dataclasses
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from moempi.errors import MoempiError
from moempi.perf.memory import check_fits, check_host_memory, memory_per_gpu, smallest_fitting_tp
from moempi.perf.analytic import (Calibration, Hardware, Layout, choose_micro_batches, forward_time,
                         pipeline_time, touch_shares, traffic_from_pairs, uniform_pairs)
from moempi.cli.plan import plan
from moempi.model.shapes import PRESETS
from moempi.io.topology import Topology

DSV3 = PRESETS["deepseek-v3"]
SEED = Hardware.from_topology(Topology())


def invoke(*args):
    return CliRunner().invoke(plan, list(args), catch_exceptions=False)


# -- memory -------------------------------------------------------------------------------
def test_seed_expert_bytes_reproduced():
    assert DSV3.expert_bytes == 2 * 7168 * 2048 * 2 == 58_720_256
    mem = memory_per_gpu(DSV3, ep=256, tp=1, tokens_per_gpu=1, micro_batches=1)
    assert mem["experts"] == 58 * 58_720_256            # one expert of each of 58 MoE layers
    out = invoke("--tokens-per-gpu", "64")
    assert out.exit_code == 0 and "58.72 MB per expert" in out.output


def test_memory_components_add_up_and_scale():
    mem = memory_per_gpu(DSV3, ep=64, tp=2, tokens_per_gpu=1024, micro_batches=4)
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    assert mem["experts"] == 58 * 4 * 58_720_256 // 2    # ceil(256/64) experts, halved by tp
    assert mem["dense"] == 3 * 2 * 7168 * 18432 * 2
    assert mem["gate"] == 58 * 7168 * 256 * 2
    more = memory_per_gpu(DSV3, ep=64, tp=2, tokens_per_gpu=2048, micro_batches=4)
    assert more["activations"] == 2 * mem["activations"] and more["experts"] == mem["experts"]
    fewer_mb = memory_per_gpu(DSV3, ep=64, tp=2, tokens_per_gpu=1024, micro_batches=1)
    assert fewer_mb["workspace"] > mem["workspace"]


def test_smallest_fitting_tp_and_check_fits():
    cap = 64e9
    assert smallest_fitting_tp(DSV3, 256, 4096, 2, cap) == 1
    need = memory_per_gpu(DSV3, 8, 1, 4096, 2)["total"]
    assert need > cap
    tp = smallest_fitting_tp(DSV3, 8, 4096, 2, cap)
    assert tp == 2
    assert memory_per_gpu(DSV3, 8, tp, 4096, 2)["total"] <= cap
    assert memory_per_gpu(DSV3, 8, tp // 2, 4096, 2)["total"] > cap
    with pytest.raises(MoempiError, match=r"needs 1\d\d\.\d\d GB per GPU of 64\.00 GB.*tp=2 would fit"):
        check_fits(DSV3, 8, 1, 4096, 2, cap)
    assert check_fits(DSV3, 8, 2, 4096, 2, cap)["total"] <= cap
    assert smallest_fitting_tp(DSV3, 1, 4096, 2, 4e9) is None   # dense layers alone exceed it
    with pytest.raises(MoempiError, match="no tp up to"):
        check_fits(DSV3, 1, 1, 4096, 2, 4e9)


# -- time ---------------------------------------------------------------------------------
def test_pipeline_time_limits():
    assert pipeline_time(2.0, 1.0, 0.1, 1) == pytest.approx(2.0 + 1.0 + 0.3)  # blocking
    # no latency, compute-bound: tends to compute + exchange / m
    assert pipeline_time(2.0, 1.0, 0.0, 100) == pytest.approx(2.0 + 1.0 / 100)
    # exchange-bound: tends to exchange + compute / m
    assert pipeline_time(1.0, 2.0, 0.0, 100) == pytest.approx(2.0 + 1.0 / 100)


def test_choose_micro_batches_trends():
    args = dict(tokens_per_rank=4096, meta=DSV3, num_ranks=256, gemm_flops=240e12,
                bandwidth_Bps=1.44e12 / 8, wire_bytes=2)
    assert choose_micro_batches(latency_s=0.0, **args) == 16
    assert choose_micro_batches(latency_s=0.0, max_micro_batches=5, **args) == 5
    picks = [choose_micro_batches(latency_s=lat, **args) for lat in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)]
    assert picks == sorted(picks, reverse=True) and picks[0] > picks[-1] == 1
    assert choose_micro_batches(**{**args, "tokens_per_rank": 3}, latency_s=0.0) == 3
    with pytest.raises(MoempiError):
        choose_micro_batches(latency_s=0.0, **{**args, "gemm_flops": 0})


def test_uniform_traffic_fractions():
    t = traffic_from_pairs(uniform_pairs(32, 1, 100, 2), 1, 8, "fat-tree")
    assert t.compute_pairs == pytest.approx(200) and t.skew == pytest.approx(1)
    assert t.intra_pairs == pytest.approx(200 * 7 / 32)       # 7 other GPUs on the node
    assert t.inter_pairs == pytest.approx(8 * 200 * 24 / 32)  # node uplink: 8 GPUs x 24/32 off-node
    direct = traffic_from_pairs(uniform_pairs(32, 1, 100, 2), 1, 8, "direct")
    assert direct.inter_pairs == pytest.approx(8 * 200 * 8 / 32)  # one of 3 node-pair links
    single = traffic_from_pairs(uniform_pairs(8, 1, 100, 2), 1, 8, "fat-tree")
    assert single.inter_pairs == 0


def test_forward_time_figures():
    fc = forward_time(DSV3, SEED, Layout(ep=256, tokens_per_gpu=4096, micro_batches=1))
    moe = fc.moe_layers
    assert len(fc.layers) == 61 and len(moe) == 58
    expert = 4096 * 2 * 4 * 7168 * 2048 / 240e12
    gate = 4096 * 2 * 7168 * 256 / 240e12
    assert moe[0].compute_s == pytest.approx(expert + gate)
    inter = 8 * 4096 * 2 * 248 / 256 * 7168 * 2 / 1.44e12     # fat-tree uplink, bf16
    assert moe[0].dispatch_inter_s == pytest.approx(inter)
    assert moe[0].blocking_s == pytest.approx(expert + gate + 2 * inter + 3e-4)
    assert fc.forward_s == pytest.approx(3 * 4096 * 4 * 7168 * 18432 / 240e12 + 58 * moe[0].blocking_s)
    # auto: the run's tuner rules.  One batch of 58 MoE layers has a budget (2 % of its MoE
    # work, 1.16 layers) below one trial's prior (3 layers): the run keeps 1, and so does plan
    one = forward_time(DSV3, SEED, Layout(ep=256, tokens_per_gpu=4096))
    assert one.moe_layers[0].micro_batches == 1 and one.tuning_s == 0.0
    assert "budget" in one.tuning["reason"]
    # a job of 100 such batches tries counts and keeps a faster one, within its budget
    auto = forward_time(DSV3, SEED, Layout(ep=256, tokens_per_gpu=4096), batches=100)
    assert auto.forward_s < fc.forward_s and auto.moe_layers[0].micro_batches > 1
    moe_work = 58 * 100 * auto.tuning["tried"][1]
    assert 0 < auto.tuning_s <= 0.02 * moe_work
    fp32 = forward_time(DSV3, SEED, Layout(ep=256, micro_batches=1, precision="fp32"))
    assert fp32.moe_layers[0].dispatch_s == pytest.approx(2 * fc.moe_layers[0].dispatch_s)


def test_calibration_roundtrip_and_use(tmp_path):
    cal = Calibration.from_measurements(5e10, {2: (2e-5, 1e9), 4: (4e-5, 5e8)}, "laptop")
    path = tmp_path / "cal.json"
    cal.save(str(path))
    back = Calibration.load(str(path))
    assert back == cal and json.loads(path.read_text())["format"] == "moempi-calibration"
    assert back.alltoall_at(4) == (4e-5, 5e8)
    lat, bw = back.alltoall_at(3)
    assert 2e-5 < lat < 4e-5 and 5e8 < bw < 1e9
    assert back.alltoall_at(64) == (4e-5, 5e8)                 # clamped
    hw = back.hardware(2, Topology(nodes=1, gpus_per_node=2))
    fc = forward_time(PRESETS["small"], hw, Layout(ep=2, tokens_per_gpu=512, micro_batches=1))
    layer = fc.moe_layers[0]
    assert layer.dispatch_s == pytest.approx(512 * 2 * 0.5 * 256 * 2 / 1e9)
    assert layer.latency_s == pytest.approx(3 * 2e-5)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "moempi-calibration", "version": 1, "gemm_flops": 1}')
    with pytest.raises(MoempiError, match="bad.json"):
        Calibration.load(str(bad))


# -- the command --------------------------------------------------------------------------
def test_plan_sweep_and_json(tmp_path):
    out_json = tmp_path / "sweep.json"
    res = invoke("--sweep", "ep=16,64,256,1024", "--json", str(out_json))
    assert res.exit_code == 0, res.output
    rows = [l.split() for l in res.output.splitlines() if l.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["16", "64", "256", "1024"]
    mem = [float(r[12]) for r in rows]
    assert mem[0] > mem[1] > mem[2] == mem[3]                  # experts per GPU shrink to one
    data = json.loads(out_json.read_text())
    assert data["sweep"]["values"] == [16, 64, 256, 1024]
    fcs = data["forecasts"]
    assert [f["num_gpus"] for f in fcs] == [16, 64, 256, 1024]
    assert fcs[-1]["tokens_per_s"] == pytest.approx(1024 * fcs[-1]["tokens_per_s_per_gpu"])
    assert len(fcs[0]["layers"]) == 61


def test_plan_single_json_reports_tp_when_not_fitting(tmp_path):
    path = tmp_path / "p.json"
    res = invoke("--ep", "8", "--json", str(path))
    assert res.exit_code == 0 and "smallest fitting tp = 2" in res.output
    data = json.loads(path.read_text())
    assert data["fits"] is False and data["smallest_fitting_tp"] == 2
    assert data["memory_bytes"]["total"] > data["memory_capacity_bytes"]


def test_plan_trace_skew(tmp_path):
    topo = tmp_path / "t.toml"
    topo.write_text("nodes = 2\ngpus_per_node = 2\n")
    meta = PRESETS["tiny"]                                      # 4 experts, MoE layers 1..5
    n = 400
    trace = tmp_path / "out.h5"
    with h5py.File(trace, "w") as f:
        f.attrs["world_size"] = 4
        f["routing/home_rank"] = (np.arange(n) * 4 // n).astype(np.int32)
        for layer in meta.moe_layers:
            idx = np.tile([0, 1], (n, 1)) if layer == 1 else np.stack(
                [np.arange(n) % 4, (np.arange(n) + 1) % 4], axis=1)
            f[f"routing/{layer:03d}/topk_idx"] = idx.astype(np.int32)
    path = tmp_path / "p.json"
    res = invoke("--preset", "tiny", "--topology", str(topo), "--trace", str(trace),
                 "--micro-batches", "1", "--json", str(path))
    assert res.exit_code == 0, res.output
    layers = {l["layer"]: l for l in json.loads(path.read_text())["layers"]}
    assert layers[1]["skew"] == pytest.approx(2.0)              # experts 0 and 1 take all
    assert layers[2]["skew"] == pytest.approx(1.0)
    assert layers[1]["compute_s"] > layers[2]["compute_s"]


def test_plan_placement_packing(tmp_path):
    pl = tmp_path / "pl.json"
    pl.write_text(json.dumps({"format": "moempi-placement", "version": 1, "num_ranks": 2,
                              "num_experts": 4, "layers": {"1": [[0], [0], [0], [1]]}}))
    path = tmp_path / "p.json"
    res = invoke("--preset", "tiny", "--ep", "2", "--placement", str(pl), "--json", str(path))
    assert res.exit_code == 0, res.output
    layers = {l["layer"]: l for l in json.loads(path.read_text())["layers"]}
    assert layers[1]["skew"] == pytest.approx(1.5) and layers[2]["skew"] == pytest.approx(1.0)


@pytest.mark.parametrize("args, message", [
    (["--sweep", "bogus=1,2"], "--sweep"),
    (["--sweep", "ep=a,b"], "integers"),
    (["--micro-batches", "zero"], "--micro-batches"),
    (["--preset", "nope"], "unknown preset"),
    (["--tp", "3"], "tp (3) must divide"),
    (["--ep", "0"], "ep must be >= 1"),
    (["--hardware", "/nonexistent/cal.json"], "calibration file not found"),
    (["--trace", "/nonexistent/out.h5"], "trace file not found"),
])
def test_plan_bad_input(args, message):
    res = CliRunner().invoke(plan, args)
    assert res.exit_code != 0 and message in res.output


def test_plan_help_explains():
    res = invoke("--help")
    assert res.exit_code == 0
    for word in ("--sweep", "--hardware", "--trace", "--micro-batches", "smallest TP"):
        assert word in res.output


def test_plan_reads_model_file(tmp_path):
    from moempi.io.hdf5 import write_model
    path = tmp_path / "m.h5"
    write_model(str(path), PRESETS["tiny"], seed=1)
    res = invoke("--model", str(path), "--ep", "4", "--tokens-per-gpu", "64")
    assert res.exit_code == 0, res.output
    assert f"{PRESETS['tiny'].expert_bytes / 1e6:.2f} MB per expert" in res.output
    assert "moe x5" in res.output


def test_hides_threshold_matches_analytic_knee():
    # hides iff dispatch + combine + 6 latency <= compute, i.e. T >= 6a / (c - x) per token
    c = (4 * 7168 * 2048 * 2 + 2 * 7168 * 256) / 240e12
    x = 2 * 8 * 2 * (248 / 256) * 7168 * 2 / 1.44e12
    knee = 6e-4 / (c - x)
    below = forward_time(DSV3, SEED, Layout(ep=256, tokens_per_gpu=int(knee * 0.97)))
    above = forward_time(DSV3, SEED, Layout(ep=256, tokens_per_gpu=int(knee * 1.03)))
    assert not below.moe_layers[0].hidden and above.moe_layers[0].hidden


def test_dp_and_tp_scale_gpus_not_per_gpu_time():
    base = forward_time(DSV3, SEED, Layout(ep=32, micro_batches=2))
    dp = forward_time(DSV3, SEED, Layout(ep=32, dp=4, micro_batches=2))
    assert dp.forward_s == pytest.approx(base.forward_s)
    assert dp.tokens_per_s == pytest.approx(4 * base.tokens_per_s)
    tp = forward_time(DSV3, SEED, Layout(ep=32, tp=2, micro_batches=2))
    assert tp.memory["experts"] == base.memory["experts"] // 2
    # as the run does it: each pair to both shards of its expert's slot, a partial row back
    # from each.  A GPU's rows to each of the 64 GPUs: T*K/32, so its node's 8 GPUs send
    # 8 * 56 / 32 T*K across the uplink (14 T*K) against 8 * 24 / 32 (6 T*K) without TP
    assert tp.moe_layers[0].dispatch_inter_s == pytest.approx(
        14 / 6 * base.moe_layers[0].dispatch_inter_s)
    assert tp.moe_layers[0].dispatch_intra_s == pytest.approx(base.moe_layers[0].dispatch_intra_s)
    assert tp.moe_layers[0].compute_s == pytest.approx(base.moe_layers[0].compute_s)


def test_fixed_cost_per_micro_batch_lowers_the_count():
    """A host cost per micro-batch that nothing hides (the runner's probed exchange step)."""
    from moempi.perf.analytic import best_micro_batches
    free = best_micro_batches(compute_s=0.1, exchange_s=0.05, latency_s=0.0)
    costly = best_micro_batches(compute_s=0.1, exchange_s=0.05, latency_s=0.0, overhead_s=0.005)
    assert free == 16 and 1 < costly < free
    assert best_micro_batches(compute_s=0.1, exchange_s=0.001, latency_s=0.0, overhead_s=0.01) == 1


def test_first_touch_paid_once_per_pass_over_the_moe_layers():
    """A fresh process's first touch: T*K*H*first_touch_s in all, spread evenly over the MoE
    layers, the same total whatever the layer count; none of it in a dense layer."""
    meta = PRESETS["small"].replace(num_layers=7, num_dense_layers=1)
    cold = Hardware(gemm_flops=1e11, latency_s=1e-5, intra_Bps=5e9, inter_Bps=5e9,
                    link="measured", gpus_per_node=2, memory_bytes=1e12, first_touch_s=2e-8)
    warm = dataclasses.replace(cold, first_touch_s=0.0)
    layout = Layout(ep=2, tokens_per_gpu=512, micro_batches=2)
    extra = [c.overlapped_s - w.overlapped_s for c, w in
             zip(forward_time(meta, cold, layout).layers, forward_time(meta, warm, layout).layers)]
    total = 512 * meta.top_k * meta.hidden_size * 2e-8
    assert extra[0] == 0.0                                   # the dense layer
    assert extra[1:] == pytest.approx([total / 6] * 6)
    deeper = meta.replace(num_layers=13)
    fc_c, fc_w = forward_time(deeper, cold, layout), forward_time(deeper, warm, layout)
    assert fc_c.forward_s - fc_w.forward_s == pytest.approx(total)
    # measured head share: that much in the first MoE layer, the rest even, same total
    head = dataclasses.replace(cold, first_touch_head=0.7)
    extra = [c.overlapped_s - w.overlapped_s for c, w in
             zip(forward_time(meta, head, layout).layers, forward_time(meta, warm, layout).layers)]
    assert extra[1:] == pytest.approx([0.7 * total] + [0.3 * total / 5] * 5)
    assert touch_shares(4) == [0.25] * 4 and touch_shares(1, 0.7) == [1.0]
    assert touch_shares(0) == []


def test_keep_freed_memory_on_glibc():
    import platform
    from moempi.runtime.heap import keep_freed_memory
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt thresholds are glibc's")
    assert keep_freed_memory()


def test_calibration_samples_roundtrip(tmp_path):
    """Each calibration process's figures travel with the file; a file without them (older
    calibrations) still loads."""
    rows = [(1e-5, 3e9, 8e10, 2e10, 1e-8, 1e-4, 2e-8, 1e-9, 2e-9, 0.7),
            (2e-5, 2e9, 6e10, 1e10, 2e-8, 0.0, 4e-8, 2e-9, 0.0, 0.5)]
    cal = Calibration.from_measurements(5e10, {2: (1e-5, 3e9)}, "vm",
                                        cpu={2: (8e10, 2e10, 1e-8, 1e-4, 2e-8, 1e-9, 1e-9, 0.6)},
                                        samples={2: rows})
    cal.save(str(tmp_path / "c.json"))
    assert Calibration.load(str(tmp_path / "c.json")) == cal
    assert dict(cal.samples)[2] == tuple(r + (0.0,) * 3 for r in rows)   # later figures: 0
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["samples"]["2"][1]["first_touch_s"] == 4e-8
    del data["samples"], data["cpu"]["2"]["dense_elem_s"], data["cpu"]["2"]["dense_touch_s"]
    del data["cpu"]["2"]["first_touch_head"], data["cpu"]["2"]["copy_elem_s"]
    del data["cpu"]["2"]["copy_bf16_elem_s"], data["cpu"]["2"]["overlap_micro_s"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = Calibration.load(str(tmp_path / "old.json"))
    assert old.samples == () and old.cpu == ((2, 8e10, 2e10, 1e-8, 1e-4, 2e-8) + (0.0,) * 6,)


def test_dense_elementwise_and_first_touch_terms():
    """A dense layer's non-GEMM work: T*(H + Fd)*dense_elem_s in every dense layer, plus
    T*(H + Fd)*dense_touch_s in layer 0 only (a fresh process's first pass); 0 on the seed
    hardware, so the DeepSeek-V3 figures are unchanged."""
    meta = PRESETS["small"]                                  # 3 dense layers
    base = Hardware(gemm_flops=1e11, latency_s=1e-5, intra_Bps=5e9, inter_Bps=5e9,
                    link="measured", gpus_per_node=2, memory_bytes=1e12)
    hw = dataclasses.replace(base, dense_elem_s=1e-9, dense_touch_s=4e-9)
    layout = Layout(ep=2, tokens_per_gpu=512, micro_batches=1)
    extra = [c.compute_s - w.compute_s for c, w in
             zip(forward_time(meta, hw, layout).layers, forward_time(meta, base, layout).layers)]
    elems = 512 * (meta.hidden_size + meta.dense_ffn_size)
    assert extra[:3] == pytest.approx([elems * 5e-9, elems * 1e-9, elems * 1e-9])
    assert extra[3:] == [0.0] * (meta.num_layers - 3)
    seed = Hardware.from_topology(Topology())
    assert seed.dense_elem_s == seed.dense_touch_s == 0.0
    fc = forward_time(PRESETS["deepseek-v3"], seed, Layout(ep=256, micro_batches=3))
    assert fc.forward_s * 1e3 == pytest.approx(192.5, abs=0.05)


def test_plan_models_node_dispatch():
    """`plan --dispatch node`: on 2 nodes with uniform routing 3/4 of the crossing pairs cross
    (one row per token and remote node), the relays forward them inside the node, and each
    micro-batch pays 7 exchange steps instead of 3."""
    from moempi.perf.analytic import uniform_node_share
    assert uniform_node_share(2, 2) == pytest.approx(0.75)
    assert uniform_node_share(1, 2) == 1.0 and uniform_node_share(64, 2) > 0.99
    layers = {}
    for mode in ("direct", "node"):
        res = CliRunner().invoke(plan, ["--topology", "input/topology-2x8.toml", "--ep", "16",
                                        "--micro-batches", "1", "--dispatch", mode,
                                        "--json", "-"])
        assert res.exit_code == 0, res.output
        data = json.loads(res.output[res.output.index("{"):])
        assert data["layout"]["dispatch"] == mode
        layers[mode] = [l for l in data["layers"] if l["kind"] == "moe"][0]
    d, n = layers["direct"], layers["node"]
    assert n["dispatch_inter_s"] == pytest.approx(0.75 * d["dispatch_inter_s"])
    assert n["dispatch_intra_s"] > d["dispatch_intra_s"]
    assert n["latency_s"] == pytest.approx(7 / 3 * d["latency_s"])


def test_host_memory_counts_the_bf16_codec():
    """On a CPU backend a BF16 wire also holds the received rows widened to float32 and the
    tokens rounded for the gather: the start-up check counts them."""
    meta, T = PRESETS["tiny"], 100

    def need(wire, on_host):
        return check_host_memory(meta, 2, T, wire, on_host, 1e12)
    weights = need(4, True) - need(4, False)
    codec = T * meta.hidden_size * (meta.top_k * 4 + 2)
    assert need(2, True) - need(2, False) == weights + codec


def test_tuner_rules_simulated_as_the_run_applies_them():
    """plan's auto count follows `moempi run`'s tuner (moempi.runtime.tune.tuned_batch):
    climb while faster by 2 %, within 2 % of the job's MoE work, one layer per trial."""
    from moempi.perf.tuning import PRIOR, candidates, simulate
    times = {1: 10.0, 2: 8.0, 3: 7.0, 4: 7.5, 6: 6.0}.get          # falls, then rises at 4
    chosen, cost, tried, reason = simulate(times, [1, 2, 3, 4, 6], 50, 10_000)
    assert chosen == 3 and list(tried) == [1, 2, 3, 4] and "no faster" in reason
    assert cost == pytest.approx((10 - 7) + (8 - 7) + 0 + (7.5 - 7))
    # a short job: the budget (2 % of 20 layers = 0.4 layer) is below one trial's prior
    assert simulate(times, [1, 2, 3], 19, 20)[:2] == (1, 0.0)
    assert 0.02 * 20 < PRIOR
    # no layer left for a trial: the seed's layer only
    assert simulate(times, [1, 2], 1, 10_000)[2] == {1: 10.0}
    assert candidates(40, 16) == [1, 2]               # no micro-batch under 16 rows


def test_tensor_parallel_traffic_is_the_runs_partial_rows():
    """With tp = 2 the run sends each pair to both shards of its slot and gets a partial row
    back from each (runtime.pipeline.tensor_parallel_pairs): 4 GPUs (2 slots x 2 shards),
    T = 100, K = 2, uniform: every GPU sends T*K*tp/4 = 100 rows to every GPU."""
    from moempi.perf.analytic import traffic_from_rows
    t = traffic_from_pairs(uniform_pairs(2, 2, 100, 2), 2, 4, "measured")
    assert t.offrank_pairs == pytest.approx(300)              # 3 other GPUs x 100 rows
    assert t.copied_rows == pytest.approx(800)                # 400 sent + 400 received
    assert t.compute_pairs == pytest.approx(200)              # 400 half-width rows = T*K
    # the same loads from the row matrix a run records (/stats/traffic)
    same = traffic_from_rows(np.full((4, 4), 100.0), None, 2, 4, "measured")
    assert (same.offrank_pairs, same.copied_rows, same.compute_pairs) == \
        pytest.approx((300, 800, 200))
    # a shard's GEMM runs at its own shape's rate (F / tp)
    hw = Hardware(gemm_flops=1e11, latency_s=0.0, intra_Bps=1e10, inter_Bps=1e10,
                  link="measured", gpus_per_node=4, memory_bytes=1e12,
                  gemm_shapes=((512, 512, 1.25), (512, 1024, 1.0),
                               (1024, 512, 1.25), (1024, 1024, 1.0)))
    assert hw.rate(512, 512) == pytest.approx(1.25e11)
    assert hw.rate(512, 724) == pytest.approx(1e11 * (1.25 - 0.25 * np.log2(724 / 512)))
    assert hw.rate(4096, 64) == pytest.approx(1.25e11)       # clamped to the grid


def test_host_overlap_hides_no_bandwidth():
    """On calibrated host hardware the ranks' cores copy the exchange: overlapped = compute +
    exchange + one fill's latencies + m * overlap_micro_s (datasheet GPUs: the pipeline)."""
    from moempi.perf.analytic import layer_time
    meta = PRESETS["small"]
    hw = Hardware(gemm_flops=1e10, latency_s=1e-5, intra_Bps=1e9, inter_Bps=1e9,
                  link="measured", gpus_per_node=2, memory_bytes=1e12, overlap_micro_s=1e-4)
    t = traffic_from_pairs(uniform_pairs(2, 1, 512, 2), 1, 2, "measured")
    lt = layer_time(meta, hw, t, 512, 4, 4, 3)
    assert lt.overlapped_s == pytest.approx(lt.compute_s + 2 * lt.dispatch_s + 3e-5 + 4e-4)
    gpu = dataclasses.replace(hw, link="fat-tree")
    assert layer_time(meta, gpu, t, 512, 4, 4, 3).overlapped_s < lt.overlapped_s
