"""Serial tests of the placement optimiser `moempi place` (pure numpy, no MPI)."""

import itertools
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from moempi.errors import MoempiError
from moempi.cli.place import place
from moempi.place.optimise import _bottleneck_assignment, place_experts
from moempi.place.routing import REGIMES, load_trace, synthetic_routing
from moempi.place.scoring import dest_ranks, evaluate, link_loads, traffic_matrix
from moempi.place.placement import Placement
from moempi.model.shapes import PRESETS
from moempi.io.topology import Topology


def meta_for(num_experts, num_moe_layers=2):
    return PRESETS["deepseek-v3"].replace(num_experts=num_experts, num_layers=3 + num_moe_layers)


def routing_for(regime, topology, meta, tokens_per_rank=64, seed=0):
    return synthetic_routing(regime, topology.num_gpus, meta, tokens_per_rank, seed=seed,
                             gpus_per_node=topology.gpus_per_node)


T2x8 = Topology(nodes=2, gpus_per_node=8)
T4x8 = Topology(nodes=4, gpus_per_node=8)
T4x4_DIRECT = Topology(nodes=4, gpus_per_node=4, link="direct")


@pytest.fixture(scope="module")
def placed():
    """A placement with replicas (32 GPUs, 16 experts) on Zipf routing."""
    meta = meta_for(16)
    routing = routing_for("zipf", T4x8, meta)
    return meta, routing, place_experts(routing, T4x8, meta)


# -- synthetic routing ---------------------------------------------------------------------
@pytest.mark.parametrize("regime", REGIMES)
def test_synthetic_routing_shapes_and_determinism(regime):
    meta = meta_for(16)
    a = routing_for(regime, T2x8, meta, seed=3)
    b = routing_for(regime, T2x8, meta, seed=3)
    c = routing_for(regime, T2x8, meta, seed=4)
    assert a.topk_idx.shape == (2, 16 * 64, meta.top_k) and a.topk_idx.dtype == np.int32
    assert a.home_rank.dtype == np.int32 and (a.home_rank == np.arange(1024) // 64).all()
    assert (a.topk_idx[:, :, 0] != a.topk_idx[:, :, 1]).all()        # distinct experts
    assert a.topk_idx.min() >= 0 and a.topk_idx.max() < 16
    assert (a.topk_idx == b.topk_idx).all() and not (a.topk_idx == c.topk_idx).all()


def test_locality_regime_prefers_home_node_experts():
    meta = meta_for(16, 1)
    routing = routing_for("locality", T2x8, meta, tokens_per_rank=256)
    counts = routing.counts(0).reshape(2, 8, 16).sum(1)             # [node, expert]
    favourite = counts.argmax(0)
    assert set(favourite.tolist()) == {0, 1}
    assert (counts.max(0) > 2 * counts.min(0)).all()


# -- invariants of the placement -----------------------------------------------------------
def test_one_expert_per_gpu_and_every_expert_hosted(placed):
    meta, routing, placement = placed
    placement.validate(T4x8.num_gpus, 16, allow_packing=False)
    for layer in meta.moe_layers:
        hosts = placement.hosts[layer]
        assert all(len(r) >= 1 for r in hosts)
        ranks = sorted(r for rs in hosts for r in rs)
        assert ranks == list(range(T4x8.num_gpus))                  # spare GPUs all hold replicas
        # the hottest expert got the most replicas
        tokens_per_expert = routing.counts(meta.moe_layers.index(layer)).sum(0)
        assert len(hosts[int(tokens_per_expert.argmax())]) == max(len(r) for r in hosts)


def test_memory_within_capacity_and_balanced(placed):
    meta, _, placement = placed
    obj = placement.objective
    assert obj["max_gpu_memory_gb"] <= T4x8.gpu_memory_gb
    assert obj["node_memory_spread_gb"] == 0


def test_packing_needs_the_flag_and_is_balanced():
    meta = meta_for(24, 4)
    routing = routing_for("zipf", T2x8, meta)
    with pytest.raises(MoempiError, match="--allow-packing"):
        place_experts(routing, T2x8, meta)
    placement = place_experts(routing, T2x8, meta, allow_packing=True)
    placement.validate(16, 24, allow_packing=True)
    with pytest.raises(MoempiError, match="two experts"):
        placement.validate(16, 24, allow_packing=False)
    for layer in meta.moe_layers:
        per_rank = np.bincount([r for rs in placement.hosts[layer] for r in rs], minlength=16)
        assert set(per_rank.tolist()) == {1, 2}
    slabs = np.zeros(16, int)
    for hosts in placement.hosts.values():
        for rs in hosts:
            slabs[list(rs)] += 1
    assert slabs.max() - slabs.min() <= 1                           # 96 slabs over 16 GPUs
    contiguous = placement.objective["baselines"]["contiguous"]["node_memory_spread_gb"]
    assert placement.objective["node_memory_spread_gb"] < contiguous


def test_deterministic():
    meta = meta_for(16)
    routing = routing_for("clusters", T4x8, meta)
    a = place_experts(routing, T4x8, meta)
    b = place_experts(routing, T4x8, meta)
    assert a.hosts == b.hosts and a.objective == b.objective


# -- quality against the baselines -----------------------------------------------------------
@pytest.mark.parametrize("topology,num_experts",
                         [(T2x8, 16), (T4x8, 16), (T4x4_DIRECT, 16), (T4x4_DIRECT, 8)])
@pytest.mark.parametrize("regime", REGIMES)
def test_never_worse_than_either_baseline(topology, num_experts, regime):
    meta = meta_for(num_experts)
    routing = routing_for(regime, topology, meta, seed=7)
    obj = place_experts(routing, topology, meta).objective
    for name in ("contiguous", "eplb"):
        base = obj["baselines"][name]
        assert obj["max_inter_node_link_tokens"] <= base["max_inter_node_link_tokens"], name
        assert (obj["sum_layer_max_inter_node_link_tokens"]
                <= base["sum_layer_max_inter_node_link_tokens"]), name


@pytest.mark.parametrize("regime,gain", [("locality", 0.5), ("clusters", 0.9)])
def test_clearly_better_on_structured_routing(regime, gain):
    meta = meta_for(16)
    routing = routing_for(regime, T4x8, meta, tokens_per_rank=128)
    obj = place_experts(routing, T4x8, meta).objective
    best = min(b["max_inter_node_link_tokens"] for b in obj["baselines"].values())
    assert obj["max_inter_node_link_tokens"] <= gain * best


# -- scoring ---------------------------------------------------------------------------------
def _direct_count(topk_idx, home_rank, placement, layer):
    """The runner's replica rule written out token by token."""
    P, g = placement.num_ranks, placement.gpus_per_node
    traffic = np.zeros((P, P), dtype=np.int64)
    for home in range(P):
        ordinal = {}
        for token in np.flatnonzero(home_rank == home):
            for e in topk_idx[token]:
                if e < 0:
                    continue
                ranks = placement.hosts[layer][e]
                near = [r for r in ranks if r // g == home // g] or list(ranks)
                k = ordinal.get(e, 0)
                ordinal[e] = k + 1
                traffic[home, near[(k + home) % len(near)]] += 1
    return traffic


def test_traffic_prediction_equals_direct_count(placed):
    meta, routing, placement = placed
    for pos, layer in enumerate(routing.moe_layers):
        topk = routing.topk_idx[pos].copy()
        topk[::7, 1] = -1                                           # some dropped pairs
        expected = _direct_count(topk, routing.home_rank, placement, layer)
        assert (traffic_matrix(topk, routing.home_rank, placement, layer) == expected).all()
        assert expected.sum() == (topk >= 0).sum()


def test_link_loads_by_hand():
    topology = Topology(nodes=2, gpus_per_node=2)
    traffic = np.array([[5, 1, 2, 0],
                        [3, 0, 0, 4],
                        [0, 6, 7, 1],
                        [1, 0, 2, 0]])
    loads = link_loads(traffic, topology)
    assert loads["inter"].tolist() == [2 + 4, 6 + 1, 6 + 1, 2 + 4]  # up0, up1, down0, down1
    assert loads["intra_out"].tolist() == [1, 3, 1, 2]
    assert loads["intra_in"].tolist() == [3, 1, 2, 1]
    assert loads["gpu_tokens"].tolist() == [9, 7, 11, 5]
    direct = link_loads(traffic, Topology(nodes=2, gpus_per_node=2, link="direct"))
    assert direct["inter"].tolist() == [0, 6, 7, 0]


def test_bottleneck_assignment_is_optimal():
    rng = np.random.default_rng(0)
    for _ in range(20):
        cost = rng.integers(0, 20, size=(5, 5)).astype(float)
        perm = _bottleneck_assignment(cost, cost)
        assert sorted(perm.tolist()) == list(range(5))
        best = min(max(cost[k, p[k]] for k in range(5)) for p in itertools.permutations(range(5)))
        assert max(cost[k, perm[k]] for k in range(5)) == best


# -- JSON ------------------------------------------------------------------------------------
def test_json_round_trip(placed, tmp_path):
    meta, routing, placement = placed
    path = tmp_path / "p.json"
    placement.save(str(path))
    data = json.loads(path.read_text())
    assert data["topology"]["nodes"] == 4 and data["topology"]["gpus_per_node"] == 8
    assert set(data["objective"]["baselines"]) == {"contiguous", "eplb"}
    again = Placement.from_dict(data, meta.moe_layers).validate(32, 16)
    assert again.hosts == placement.hosts and again.gpus_per_node == 8
    assert evaluate(routing, again, T4x8, meta)["max_inter_node_link_tokens"] == \
        placement.objective["max_inter_node_link_tokens"]


# -- traces and the command ------------------------------------------------------------------
def write_run_output(path, routing, meta, placement, drop_every=0, tamper=False, micro_batches=1):
    """A run output in the layout `moempi run --save-routing` writes."""
    with h5py.File(path, "w") as f:
        f.attrs["world_size"] = routing.num_ranks
        f.attrs["micro_batches"] = micro_batches
        f.attrs["config"] = json.dumps({"pipeline": {"batch_tokens": 0}})
        fields = {k: getattr(meta, k) for k in meta.__dataclass_fields__}
        f.attrs["model_meta"] = json.dumps(fields)
        f.attrs["placement"] = json.dumps(placement.to_dict())
        f["routing/home_rank"] = routing.home_rank
        traffic = []
        for pos, layer in enumerate(routing.moe_layers):
            topk = routing.topk_idx[pos]
            dest = dest_ranks(topk, routing.home_rank, placement, layer, 0, micro_batches)
            if drop_every:
                dest[::drop_every, 0] = -1
            live = dest >= 0
            src = np.broadcast_to(routing.home_rank[:, None], dest.shape)[live].astype(np.int64)
            P = routing.num_ranks
            t = np.bincount(src * P + dest[live], minlength=P * P).reshape(P, P)
            traffic.append(t)
            f[f"routing/{layer:03d}/topk_idx"] = topk
            f[f"routing/{layer:03d}/dest_rank"] = dest
        traffic = np.stack(traffic)
        if tamper:
            traffic[0, 0, 9] += 1
        f["stats/traffic"] = traffic


def test_trace_loader_masks_dropped_pairs_and_checks_model(placed, tmp_path):
    meta, routing, placement = placed
    path = str(tmp_path / "out.h5")
    write_run_output(path, routing, meta, placement, drop_every=5)
    trace = load_trace(path, meta)
    assert trace.num_ranks == 32 and trace.moe_layers == tuple(meta.moe_layers)
    assert (trace.topk_idx[:, ::5, 0] == -1).all()
    assert trace.counts(0).sum() == routing.counts(0).sum() - len(range(0, routing.num_tokens, 5))
    with pytest.raises(MoempiError, match="another model.*num_experts"):
        load_trace(path, meta_for(32))


def topology_file(tmp_path, nodes, gpus_per_node, **extra):
    path = tmp_path / f"topo{nodes}x{gpus_per_node}.toml"
    lines = [f"nodes = {nodes}", f"gpus_per_node = {gpus_per_node}"]
    lines += [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in extra.items()]
    path.write_text("[topology]\n" + "\n".join(lines) + "\n")
    return str(path)


def test_command_place_evaluate_and_compare(placed, tmp_path):
    meta, routing, placement = placed
    runner = CliRunner()
    topo = topology_file(tmp_path, 4, 8)
    out = str(tmp_path / "out.h5")
    write_run_output(out, routing, meta, placement)
    pjson = str(tmp_path / "p.json")
    res = runner.invoke(place, ["--topology", topo, "--trace", out, "-o", pjson])
    assert res.exit_code == 0, res.output
    assert "max_inter_node_link_tokens" in res.output and "eplb" in res.output
    assert Placement.load(pjson, meta.moe_layers).hosts == placement.hosts
    res = runner.invoke(place, ["--topology", topo, "--trace", out, "--evaluate", pjson])
    assert res.exit_code == 0, res.output
    res = runner.invoke(place, ["--topology", topo, "--compare-run", out])
    assert res.exit_code == 0, res.output
    assert "equals the measured traffic in all 2" in res.output
    # replicas are dealt round-robin per micro-batch: the prediction splits as the run did
    write_run_output(out, routing, meta, placement, micro_batches=3)
    whole = traffic_matrix(routing.topk_idx[0], routing.home_rank, placement, 3)
    with h5py.File(out, "r") as f:
        assert (f["stats/traffic"][0] != whole).any()
    res = runner.invoke(place, ["--topology", topo, "--compare-run", out])
    assert res.exit_code == 0, res.output
    write_run_output(out, routing, meta, placement, tamper=True)
    res = runner.invoke(place, ["--topology", topo, "--compare-run", out])
    assert res.exit_code == 1 and "differs from the prediction in MoE layer(s) 3" in res.output


def test_command_bad_inputs(placed, tmp_path):
    meta, routing, placement = placed
    runner = CliRunner()
    pjson = str(tmp_path / "p.json")
    placement.save(pjson)
    out = str(tmp_path / "out.h5")
    write_run_output(out, routing, meta, placement)
    # a topology whose GPU count differs from the placement's ranks
    topo16 = topology_file(tmp_path, 2, 8)
    res = runner.invoke(place, ["--topology", topo16, "--preset", "deepseek-v3", "--synthetic",
                                "uniform", "--tokens-per-rank", "4", "--evaluate", pjson])
    assert res.exit_code == 1 and "2 x 8 GPUs" in res.output and "32" in res.output
    res = runner.invoke(place, ["--topology", topo16, "--trace", out])
    assert res.exit_code == 1 and "recorded on 32 ranks" in res.output
    # memory that cannot fit the experts: 58 layers x 58.7 MB > 1 GB
    small = topology_file(tmp_path, 32, 8, gpu_memory_gb=1.0)
    res = runner.invoke(place, ["--topology", small, "--preset", "deepseek-v3",
                                "--synthetic", "uniform", "--tokens-per-rank", "1"])
    assert res.exit_code == 1 and "memory" in res.output and "gpu_memory_gb is 1.0" in res.output
    # a trace from another model
    res = runner.invoke(place, ["--topology", topology_file(tmp_path, 4, 8), "--preset", "small",
                                "--trace", out])
    assert res.exit_code == 1 and "another model" in res.output
    # no routing source, no topology
    res = runner.invoke(place, ["--topology", topo16, "--preset", "tiny"])
    assert res.exit_code == 1 and "routing source" in res.output
    res = runner.invoke(place, ["--preset", "tiny", "--synthetic", "zipf"])
    assert res.exit_code == 1 and "--topology is required" in res.output


def test_memory_error_from_the_optimiser():
    meta = meta_for(16)
    routing = routing_for("uniform", T2x8, meta, tokens_per_rank=4)
    tight = Topology(nodes=2, gpus_per_node=8, gpu_memory_gb=0.1)
    with pytest.raises(MoempiError, match="memory: each GPU must hold up to 2 expert slabs"):
        place_experts(routing, tight, meta)


def test_quick_benchmark():
    from moempi.place.bench import run_benchmark
    printed = []
    rows = run_benchmark(echo=printed.append, quick=True)
    assert len(rows) == 3 * len(REGIMES)
    assert printed and printed[0].count("\n| ") == len(rows) + 2
    for row in rows:
        assert row["ours_inter"] <= min(row["contiguous_inter"], row["eplb_inter"])


def test_placement_for_node_dispatch_puts_co_activated_experts_together():
    """Placed for node dispatch (a token crosses to a node once), co-activating clusters of
    experts cross less than with the placement made for the direct dispatch, and less than
    both baselines, every GPU's load kept (each swap moves a GPU's experts whole)."""
    from moempi.io.topology import Topology
    from moempi.model.shapes import PRESETS
    from moempi.place.optimise import place_experts
    from moempi.place.routing import synthetic_routing
    from moempi.place.scoring import evaluate
    topo = Topology(nodes=2, gpus_per_node=8, link="fat-tree")
    meta = PRESETS["deepseek-v3"].replace(num_experts=16, num_layers=5)
    routing = synthetic_routing("clusters", 16, meta, 64, seed=0, gpus_per_node=8)
    direct = place_experts(routing, topo, meta)
    node = place_experts(routing, topo, meta, dispatch="node")
    ours = node.objective
    assert ours["dispatch"] == "node"
    as_direct = evaluate(routing, direct, topo, meta, "node")
    link = "max_inter_node_link_tokens"
    assert ours[link] < as_direct[link]
    for base in ("contiguous", "eplb"):
        assert ours[link] < ours["baselines"][base][link], base
    assert ours["max_gpu_tokens"] <= as_direct["max_gpu_tokens"]
    # scored under node dispatch a placement never crosses more than under the direct one
    assert as_direct[link] <= direct.objective[link]


def test_time_objective_trades_link_load_for_compute_balance():
    """`--objective time` keeps, per layer, the candidate with the least predicted layer time
    (the slower of busiest GPU compute and busiest link transfer): never slower than the
    link-first placement or either baseline, and on 2 x 8 GPUs with 24 experts and uniform
    routing it gives up link load for the busiest GPU's (the links objective's weak spot)."""
    from moempi.io.topology import Topology
    from moempi.model.shapes import PRESETS
    from moempi.place.optimise import place_experts
    from moempi.place.routing import synthetic_routing
    topo = Topology(nodes=2, gpus_per_node=8)
    meta = PRESETS["deepseek-v3"].replace(num_experts=24, num_layers=5)
    routing = synthetic_routing("uniform", 16, meta, 64, seed=0, gpus_per_node=8)
    links = place_experts(routing, topo, meta, allow_packing=True).objective
    timed = place_experts(routing, topo, meta, allow_packing=True, objective="time").objective
    t = "predicted_moe_layers_ms"
    assert timed["objective"] == "time" and timed[t] <= links[t]
    for base in ("contiguous", "eplb"):
        assert timed[t] <= timed["baselines"][base][t], base
    assert timed["max_gpu_tokens"] < links["max_gpu_tokens"]
    assert timed["max_inter_node_link_tokens"] > links["max_inter_node_link_tokens"]
