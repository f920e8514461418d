"""Load balancing: MaxVio falls with the bias on and not with it off; outputs replay exactly."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from conftest import mpirun
from moempi.model.balance import BiasBalancer, apply_capacity, capacity, max_violation
from moempi.io.config import BalanceSection
from reference import forward, rel_l2


NUM_TOKENS, BATCH = 2400, 100          # 2 ranks: 12 batches of 100 tokens per rank


@pytest.fixture(scope="module")
def skewed(files, tmp_path_factory):
    """A deliberately skewed gate: tokens share a direction that experts 0 and 1 favour."""
    d = tmp_path_factory.mktemp("skew")
    model, tokens = d / "skewed.h5", d / "tokens.h5"
    shutil.copy(files / "e4.h5", model)
    with h5py.File(model, "a") as f:
        for l in range(1, 6):
            g = f[f"layers/{l:03d}/gate"]
            w = (g[()].astype(np.uint32) << 16).view(np.float32)
            w[0, 0] += 1.0
            w[0, 1] += 0.5
            g[...] = (w.view(np.uint32) >> 16).astype(np.uint16)   # exact in bf16
    x = np.random.default_rng(7).standard_normal((NUM_TOKENS, 64)).astype(np.float32)
    x[:, 0] += 4
    with h5py.File(tokens, "w") as f:
        f["tokens"] = x
    return model, tokens


def run(files, tmp_path, skewed, name, *extra):
    out = tmp_path / name
    mpirun(2, "run", "--model", skewed[0], "--tokens", skewed[1], "--output", out,
           "--set", f"pipeline.batch_tokens={BATCH}", *extra)
    return out


def per_token_bias(path, num_tokens, ranks, batch_tokens):
    """Expand the recorded per-batch bias to ``{layer: [N, E]}`` for the reference."""
    with h5py.File(path, "r") as f:
        bias = f["balance/bias"][()]                  # [B, L_moe, E]
        layers = f["stats/moe_layers"][()]
    batch_of = np.empty(num_tokens, dtype=int)
    for r in range(ranks):
        a, b = num_tokens * r // ranks, num_tokens * (r + 1) // ranks
        batch_of[a:b] = np.arange(b - a) // batch_tokens
    return {int(l): bias[batch_of, m] for m, l in enumerate(layers)}


def test_bias_balancing_lowers_maxvio_and_replays(files, tmp_path, skewed):
    on = run(files, tmp_path, skewed, "on.h5", "--set", "balance.enabled=true",
             "--set", "balance.rate=0.02")
    off = run(files, tmp_path, skewed, "off.h5")
    with h5py.File(on, "r") as f:
        vio_on = f["balance/max_violation"][()].mean(axis=1)     # [B]
        assert f["balance/bias"].shape == (12, 5, 4)
        assert (f["balance/bias"][0] == 0).all()
    with h5py.File(off, "r") as f:
        vio_off = f["balance/max_violation"][()].mean(axis=1)
        assert (f["balance/bias"][()] == 0).all()
    assert vio_on[0] == pytest.approx(vio_off[0])           # same first batch
    assert vio_off[:2].mean() > 0.5                         # the gate is skewed
    assert vio_on[-3:].mean() < 0.6 * vio_on[:2].mean()     # balancing works
    assert vio_off[-3:].mean() > 0.8 * vio_off[:2].mean()   # and nothing else does it
    # the run with balancing equals a reference replaying the recorded biases
    biases = per_token_bias(on, NUM_TOKENS, 2, BATCH)
    with h5py.File(on, "r") as f:
        assert rel_l2(f["hidden"][()], forward(str(skewed[0]), str(skewed[1]), biases)) <= 1e-4


def test_capacity_reroute_and_drop(files, tmp_path, skewed):
    for mode in ("reroute", "drop"):
        out = run(files, tmp_path, skewed, f"{mode}.h5", "--set", "balance.capacity_factor=1.1",
                  "--set", f"balance.overflow={mode}", "--save-routing", "--micro-batches", "1")
        with h5py.File(out, "r") as f:
            moved, lost = f["stats/rerouted"][()], f["stats/dropped"][()]
            assert (moved + lost).sum() > 0
            if mode == "reroute":
                assert lost.sum() == 0 or moved.sum() > 0
            else:
                assert moved.sum() == 0 and lost.sum() > 0
                assert (f["routing/002/dest_rank"][()] == -1).sum() > 0
            load = f["balance/tokens_per_expert"][()]          # [B, L_moe, E]
            # each batch: at most ceil(factor x mean) per home rank (one micro-batch each)
            assert load.max() <= 2 * np.ceil(1.1 * BATCH * 2 / 4)


def test_balancer_update_rule():
    bal = BiasBalancer(BalanceSection(enabled=True, rate=0.1, clip=0.15), 1, 3)
    bal.update(np.array([[10, 5, 0]]))
    assert np.allclose(bal.bias, [[-0.1, 0.0, 0.1]])
    bal.update(np.array([[10, 5, 0]]))
    assert np.allclose(bal.bias, [[-0.15, 0.0, 0.15]])     # clipped
    assert max_violation(np.array([4, 2, 0]))[()] == pytest.approx(1.0)


def test_apply_capacity_keeps_best_and_reroutes():
    scores = np.array([[0.9, 0.1, 0.0], [0.8, 0.15, 0.05], [0.7, 0.2, 0.1]], dtype=np.float32)
    idx = np.array([[0], [0], [0]], dtype=np.int32)
    room = capacity(3, 3, np.ones(3, dtype=int), 1.0)        # one slot each
    new, moved, lost = apply_capacity(scores, idx, room, reroute=True)
    assert new[:, 0].tolist() == [0, 1, 2] and moved == 2 and lost == 0
    new, moved, lost = apply_capacity(scores, idx, room, reroute=False)
    assert new[:, 0].tolist() == [0, -1, -1] and lost == 2


def test_dropped_pair_does_not_reweight_the_others():
    from moempi.model.balance import topk_weights_for
    probs = np.array([[0.6, 0.3, 0.1]], dtype=np.float32)
    chosen = np.array([[0, 1]])
    assert np.allclose(topk_weights_for(probs, np.array([[0, -1]]), chosen, True), [[2 / 3, 0]])
    assert np.allclose(topk_weights_for(probs, np.array([[0, 2]]), chosen, True), [[6 / 7, 1 / 7]])
    assert np.allclose(topk_weights_for(probs, np.array([[0, -1]]), chosen, False), [[0.6, 0]])
