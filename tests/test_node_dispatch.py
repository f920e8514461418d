"""Node-deduplicated dispatch (``pipeline.dispatch = "node"``): each token crosses to a node
once; correct against the reference at 4, 8 and 16 ranks on 2 and 4 nodes, with replicas and
capacity; the per-node counters count exactly the rows that cross."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from conftest import mpirun
from reference import forward, rel_l2

EXACT = 1e-4


def placement_file(tmp_path, num_experts, ranks, per_node, moe_layers):
    from moempi.place.placement import Placement
    data = Placement.default(num_experts, ranks, moe_layers).to_dict()
    data["topology"] = {"nodes": ranks // per_node, "gpus_per_node": per_node}
    path = tmp_path / f"p{ranks}x{per_node}.json"
    path.write_text(json.dumps(data))
    return path


def run(files, tmp_path, ranks, per_node, model, mode, *extra):
    layers = {"e16.h5": range(1, 4), "e4.h5": range(1, 6)}[model]
    experts = 16 if model == "e16.h5" else 4
    out = tmp_path / f"{mode}.h5"
    mpirun(ranks, "run", "--model", files / model, "--tokens", files / "tok.h5", "--output",
           out, "--placement", placement_file(tmp_path, experts, ranks, per_node, layers),
           "--set", f"pipeline.dispatch={mode}", "--micro-batches", "2", "--save-routing",
           "--set", "parallel.allow_packing=true",
           *extra, timeout=180)
    return out


def crossings(path, per_node):
    """From the saved routing: rows crossing nodes when each pair goes alone (direct) and
    when each token goes once per remote node (node dispatch)."""
    with h5py.File(path, "r") as f:
        home = f["routing/home_rank"][()] // per_node
        direct = node = 0
        for layer in f["stats/moe_layers"][()]:
            dest = f[f"routing/{int(layer):03d}/dest_rank"][()]
            remote = (dest >= 0) & (dest // per_node != home[:, None])
            direct += int(remote.sum())
            for row, mask in zip(dest // per_node, remote):
                node += len(set(row[mask]))
    return direct, node


def inter_node_rows(path):
    with h5py.File(path, "r") as f:
        nt = f["stats/node_traffic"][()]
    return int(nt.sum() - np.trace(nt, axis1=1, axis2=2).sum())


@pytest.mark.parametrize("ranks,per_node,model,with_direct", [
    (4, 2, "e16.h5", True), (8, 4, "e16.h5", False), (8, 2, "e4.h5", False),
    (16, 4, "e16.h5", False)])
def test_node_dispatch_matches_the_reference_and_counts_crossings(files, tmp_path, ranks,
                                                                  per_node, model,
                                                                  with_direct):
    """2 and 4 nodes (8 ranks of e4: every expert replicated on 2 of the 4 nodes).  The
    direct dispatch beside it once (the capacity test compares them again)."""
    ref = forward(str(files / model), str(files / "tok.h5"))
    node = run(files, tmp_path, ranks, per_node, model, "node")
    with h5py.File(node, "r") as b:
        assert rel_l2(b["hidden"][()], ref) <= EXACT
        assert b.attrs["dispatch"] == "node"
    want_direct, want_node = crossings(node, per_node)     # the routing is the direct one's
    assert inter_node_rows(node) == want_node <= want_direct
    if with_direct:
        direct = run(files, tmp_path, ranks, per_node, model, "direct")
        with h5py.File(direct, "r") as a, h5py.File(node, "r") as b:
            assert rel_l2(b["hidden"][()], a["hidden"][()]) <= 1e-6
            assert a.attrs["dispatch"] == "direct"
            for name in ("routing/001/dest_rank", "stats/tokens_per_expert"):
                assert np.array_equal(a[name][()], b[name][()]), name
        assert inter_node_rows(direct) == want_direct > want_node


def test_node_dispatch_with_capacity_routes_as_direct(files, tmp_path):
    extra = ["--set", "balance.capacity_factor=1.1", "--set", "pipeline.batch_tokens=30",
             "--set", "balance.enabled=true", "--set", "balance.rate=0.02"]
    direct = run(files, tmp_path, 8, 4, "e16.h5", "direct", *extra)
    node = run(files, tmp_path, 8, 4, "e16.h5", "node", *extra)
    with h5py.File(direct, "r") as a, h5py.File(node, "r") as b:
        assert (a["stats/rerouted"][()] + a["stats/dropped"][()]).sum() > 0
        for name in ("routing/002/topk_idx", "routing/002/dest_rank", "balance/bias"):
            assert np.array_equal(a[name][()], b[name][()]), name
        assert rel_l2(b["hidden"][()], a["hidden"][()]) <= 1e-6


def test_node_dispatch_refused_where_it_does_not_apply(files, tmp_path):
    proc = mpirun(4, "run", "--model", files / "e4.h5", "--tokens", files / "tok.h5",
                  "--output", tmp_path / "o.h5", "--set", "pipeline.dispatch=node",
                  "--set", "parallel.tp=2", check=False, timeout=60)
    assert proc.returncode != 0
    [line] = proc.stderr.strip().splitlines()
    assert "pipeline.dispatch = node: not with parallel.tp > 1" in line


@pytest.mark.parametrize("extra", [[], ["--no-overlap"]])
def test_node_dispatch_timed_count_and_blocking(files, tmp_path, extra):
    """The start-up timing of the micro-batch count runs node exchangers too; and the
    blocking exchange (every collective in micro-batch order)."""
    out = tmp_path / "out.h5"
    mpirun(4, "run", "--model", files / "e4.h5", "--tokens", files / "tok.h5", "--output", out,
           "--placement", placement_file(tmp_path, 4, 4, 2, range(1, 6)),
           "--set", "pipeline.dispatch=node", "--set", "pipeline.tuning_budget=1", *extra,
           timeout=120)
    with h5py.File(out, "r") as f:
        assert rel_l2(f["hidden"][()], forward(str(files / "e4.h5"), str(files / "tok.h5"))) \
            <= EXACT
        tuned = json.loads(f.attrs["tuning"])["micro_batches"]
        assert (tuned is not None) == (not extra)
        if tuned:                  # a budget of the whole forecast: the climb tries 2
            assert tuned["layer_seconds"]["1"] and tuned["layer_seconds"]["2"]
