"""Tensor parallelism inside experts (``parallel.tp``): the world as ep x tp x dp, each rank
holding one shard of its slot's experts, partial outputs summed in the combine
(docs/design.md §3).  Every layout against the float64 reference."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from conftest import moempi, mpirun, names
from reference import forward, rel_l2

EXACT = 1e-4
BF16_WIRE = 3e-2
BATCH = 25


def run(files, tmp_path, layout, model="e4.h5", *extra, name="out.h5", check=True):
    ep, tp, dp = layout
    out = tmp_path / name
    proc = mpirun(ep * tp * dp, "run", "--model", files / model, "--tokens", files / "tok.h5",
                  "--output", out, "--set", f"parallel.ep={ep}", "--set", f"parallel.tp={tp}",
                  "--set", f"parallel.dp={dp}", *extra, check=check, timeout=180)
    return out, proc


def replayed_biases(path, ranks):
    """The recorded per-batch balance bias as ``{layer: [N, E]}`` for the reference."""
    with h5py.File(path, "r") as f:
        bias, layers = f["balance/bias"][()], f["stats/moe_layers"][()]
        n = f["hidden"].shape[0]
    batch_of = np.empty(n, dtype=int)
    for r in range(ranks):
        a, b = n * r // ranks, n * (r + 1) // ranks
        batch_of[a:b] = np.arange(b - a) // BATCH
    return {int(l): bias[batch_of, m] for m, l in enumerate(layers)}


@pytest.mark.parametrize("layout,model,weights", [
    ((2, 2, 1), "e4.h5", "each"), ((4, 2, 1), "e4.h5", "each"), ((3, 2, 1), "e3.h5", "each"),
    ((1, 4, 1), "e4.h5", "each"), ((2, 2, 2), "e4.h5", "rank0"), ((8, 2, 1), "e16.h5", "each")])
def test_tensor_parallel_layouts_match_the_reference(files, tmp_path, layout, model, weights):
    """Overlapped, 3 micro-batches, batches of 25 tokens with bias balancing on: equal to
    the float64 reference replaying the recorded biases.  (2, 2, 2) loads through rank 0,
    which sends every shard its part, and checks the replicas' shards against each other."""
    out, proc = run(files, tmp_path, layout, model, "--micro-batches", "3",
                    "--set", f"pipeline.batch_tokens={BATCH}", "--set", "balance.enabled=true",
                    "--set", "balance.rate=0.01", "--weights", weights)
    if layout[2] > 1:
        assert "replicas verified" in proc.stdout
    ep, tp, dp = layout
    assert f"(ep={ep}, tp={tp}, dp={dp})" in proc.stdout
    ref = forward(str(files / model), str(files / "tok.h5"), replayed_biases(out, ep * tp * dp))
    with h5py.File(out, "r") as f:
        assert rel_l2(f["hidden"][()], ref) <= EXACT
        assert int(f.attrs["tp"]) == tp
        traffic = f["stats/traffic"][()]                          # [L_moe, P, P]
        # every pair reaches all tp shards of its slot: each shard receives the same rows
        per_rank = traffic.sum(axis=1)                             # rows received [L_moe, P]
        shards = per_rank.reshape(per_rank.shape[0], dp, ep, tp)
        assert (shards == shards[..., :1]).all()


def test_capacity_with_tensor_parallelism_routes_as_without(files, tmp_path):
    """Capacity and balancing on: (ep, tp, dp) = (2, 2, 1) routes every pair as (2, 1, 2) does
    (the same slots, the same tokens per rank) and gives the same rows to 1e-5."""
    extra = ["--micro-batches", "2", "--set", f"pipeline.batch_tokens={BATCH}",
             "--set", "balance.enabled=true", "--set", "balance.rate=0.02",
             "--set", "balance.capacity_factor=1.1", "--save-routing"]
    tp_out, _ = run(files, tmp_path, (2, 2, 1), "e4.h5", *extra, name="tp.h5")
    dp_out, _ = run(files, tmp_path, (2, 1, 2), "e4.h5", *extra, name="dp.h5")
    with h5py.File(tp_out, "r") as a, h5py.File(dp_out, "r") as b:
        assert (a["stats/rerouted"][()] + a["stats/dropped"][()]).sum() > 0   # capacity acted
        for name in ("routing/002/topk_idx", "stats/tokens_per_expert", "balance/bias"):
            assert np.array_equal(a[name][()], b[name][()]), name
        assert rel_l2(a["hidden"][()], b["hidden"][()]) <= 1e-5


def test_bf16_wire_with_tensor_parallelism(files, tmp_path):
    out, _ = run(files, tmp_path, (2, 2, 1), "e4.h5", "--precision", "bf16",
                 "--micro-batches", "2")
    with h5py.File(out, "r") as f:
        assert rel_l2(f["hidden"][()], forward(str(files / "e4.h5"), str(files / "tok.h5"))) \
            <= BF16_WIRE


@pytest.mark.parametrize("n,sets,message", [
    (2, ["parallel.tp=2", "parallel.ep=1"], None),
    (4, ["parallel.tp=3"], "parallel.tp = 3 x parallel.dp = 1 does not divide the world size 4"),
    (3, ["parallel.tp=3", "parallel.ep=1"], "parallel.tp = 3 does not divide the expert hidden "
                                            "size 32"),
    (1, ["parallel.tp=2"], "does not divide the world size 1")])
def test_tensor_parallel_layout_refused_with_one_line(files, tmp_path, n, sets, message):
    args = [x for s in sets for x in ("--set", s)]
    out = tmp_path / "out.h5"
    proc = mpirun(n, "run", "--model", files / "e4.h5", "--tokens", files / "tok.h5",
                  "--output", out, *args, check=False, timeout=60)
    if message is None:                      # (ep 1, tp 2) on 2 ranks: a valid layout
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode != 0
    [line] = proc.stderr.strip().splitlines()            # one line, whatever the rank count
    assert line.startswith("moempi: error: ") and message in line, proc.stderr
    assert names(tmp_path) == []


def test_memory_check_and_plan_name_the_tp_that_run_accepts(files, tmp_path):
    """A GPU too small for tp = 1 at (ep 2, 8 tokens per GPU): `run` refuses naming tp = 2,
    `plan` with the same figures says the same, and `run` at tp = 2 is accepted."""
    from moempi.io.hdf5 import read_model_meta
    from moempi.perf.memory import memory_per_gpu
    meta = read_model_meta(str(files / "e16.h5"))
    need = {tp: memory_per_gpu(meta, 2, tp, 8, 1, 4, 4)["total"] for tp in (1, 2)}
    assert need[2] < need[1]
    gb = (need[1] + need[2]) / 2 / 1e9
    common = ["--micro-batches", "1", "--set", "pipeline.batch_tokens=8",
              "--set", f"run.gpu_memory_gb={gb}"]
    _, refused = run(files, tmp_path, (2, 1, 1), "e16.h5", *common, name="a.h5", check=False)
    assert refused.returncode != 0 and "tp=2 would fit" in refused.stderr, refused.stderr
    topo = tmp_path / "topo.toml"
    topo.write_text(f"[topology]\nnodes = 1\ngpus_per_node = 2\ngpu_memory_gb = {gb}\n")
    plan = moempi("plan", "--model", files / "e16.h5", "--topology", topo, "--ep", "2",
                  "--tokens-per-gpu", "8", "--micro-batches", "1", "--precision", "fp32",
                  "--json", "-")
    data = json.loads(plan.stdout[plan.stdout.index("{"):])
    assert data["fits"] is False and data["smallest_fitting_tp"] == 2
    out, _ = run(files, tmp_path, (2, 2, 1), "e16.h5", *common, name="b.h5")
    assert out.exists()
