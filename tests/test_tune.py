"""The micro-batch choice (:func:`moempi.runtime.tune.tuned_batch`): chosen on the first
batch's own layers, within its budget, and what a short job pays (nothing)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from conftest import mpirun
from moempi.measure.bench import Shape, _context, synthetic
from moempi.model.stack import Weights
from moempi.runtime import tune
from moempi.runtime.dispatch import Exchanger
from moempi.runtime.pipeline import run_batch

SHAPE = Shape("tiny", 32, 16, 96, layers=8, dense_ffn=24)


def _tuned(monkeypatch, profile, moe_executions, counts=(1, 2, 3, 4)):
    """tuned_batch on one rank with planted per-layer seconds ``profile[m]``."""
    weights, placement, x = synthetic(MPI.COMM_SELF, SHAPE)
    monkeypatch.setattr(tune, "segment_seconds", lambda m, measured: profile[m])
    ctx = _context(MPI.COMM_SELF, weights, placement)
    exchangers = [Exchanger(MPI.COMM_SELF, SHAPE.hidden, weights.meta.num_experts, "fp32")
                  for _ in range(max(counts))]
    try:
        rows, tuning = tune.tuned_batch(MPI.COMM_SELF, ctx, exchangers, x.copy(), 0,
                                        list(counts), moe_executions)
        # the same schedule, run segment by segment by hand, gives the same bits
        again = x.copy()
        layers = list(weights.layers)
        for a, b, m in tuning.schedule:
            sub = [l for l in layers if a <= l.index < b]
            again = run_batch(_context(MPI.COMM_SELF, Weights(weights.meta, sub, None),
                                       placement), exchangers[:m], again, 0, 0)
    finally:
        for ex in exchangers:
            ex.close()
    assert np.array_equal(rows, again)
    covered = [l for a, b, _ in tuning.schedule for l in range(a, b)]
    assert covered == list(range(weights.meta.num_layers))      # every layer once, in order
    return tuning


def test_a_short_job_tries_nothing_and_pays_nothing(monkeypatch):
    """8 MoE layers, one batch (or 100): a trial could cost more than 2 % of the MoE work, so the
    smallest count runs everything (the old start-up timing ran 3 extra layers per count)."""
    tuning = _tuned(monkeypatch, {1: 1.0, 2: 0.7, 3: 0.6, 4: 0.9}, moe_executions=8)
    assert tuning.chosen == 1 and tuning.cost_s < 0.01
    assert [m for _, _, m in tuning.schedule] == [1, 1, 1]  # warm-up, second MoE layer, the rest
    assert "budget" in tuning.reason
    assert _tuned(monkeypatch, {1: 1.0, 2: 0.7, 3: 0.6, 4: 0.9}, moe_executions=100).chosen == 1


def test_a_long_job_climbs_to_the_best_count_within_budget(monkeypatch):
    """Enough MoE work ahead (400 layer runs): the climb tries 2, 3, then 4 (slower) and
    keeps 3; each trial layer is part of the output, so the cost is only the time those
    layers took beyond 3's, under 2 % of the forecast."""
    profile = {1: 1.0, 2: 0.8, 3: 0.7, 4: 0.75}
    tuning = _tuned(monkeypatch, profile, moe_executions=400)
    assert tuning.chosen == 3
    assert [m for _, _, m in tuning.schedule] == [1, 1, 2, 3, 4, 3]   # warm-up first
    planted = sum(profile[m] - profile[3] for m in (1, 2, 3, 4))
    assert tuning.cost_s == pytest.approx(planted, abs=0.01)
    assert tuning.cost_s <= tuning.budget_s == pytest.approx(0.02 * 1.0 * 400)


def test_a_slower_count_ends_the_climb(monkeypatch):
    tuning = _tuned(monkeypatch, {1: 1.0, 2: 1.3, 3: 0.1, 4: 0.1}, moe_executions=200)
    assert tuning.chosen == 1 and "no faster" in tuning.reason
    assert [m for _, _, m in tuning.schedule] == [1, 1, 2, 1]


def test_run_records_a_tuning_that_costs_under_two_percent(files, tmp_path):
    """The whole job, 61 layers at 2 ranks, automatic count: the tuning's cost is recorded
    in the output (and printed), and is at most 2 % of the forward.  The start-up timing it
    replaced spent more than the forward itself on such a job."""
    out = tmp_path / "out.h5"
    proc = mpirun(2, "run", "--model", files / "deep.h5", "--tokens", files / "tok.h5",
                  "--output", out)
    assert "chosen on the first batch's own layers" in proc.stdout
    assert "of the forward)" in proc.stdout
    with h5py.File(out, "r") as f:
        tuning = json.loads(f.attrs["tuning"])
        phases = json.loads(f.attrs["phase_seconds"])
        assert tuning["micro_batches"]["chosen"] == f.attrs["micro_batches"]
    assert 0 <= tuning["cost_share_of_forward"] <= 0.02
    assert set(phases) == {"start_up", "weights", "tuning", "forward", "replay"}


@pytest.mark.parametrize("profile,executions", [
    ({1: 1.0, 2: 0.8, 3: 0.7, 4: 0.75}, 400),      # climbs to 3
    ({1: 1.0, 2: 0.7, 3: 0.6, 4: 0.9}, 8),         # no budget
    ({1: 1.0, 2: 1.3, 3: 0.1, 4: 0.1}, 200),       # 2 is slower: stops
    ({1: 1.0, 2: 0.9, 3: 0.8, 4: 0.7}, 10_000),    # runs out of MoE layers (7 after the first)
])
def test_plan_follows_the_runs_tuner(monkeypatch, profile, executions):
    """`moempi plan`'s auto count (perf.tuning.simulate) is the run's: the same rules on the
    same layer times give the same count, trials and reason."""
    from moempi.perf.tuning import simulate
    run = _tuned(monkeypatch, profile, executions)
    moe_layers = SHAPE.layers
    chosen, cost, tried, reason = simulate(profile.get, [1, 2, 3, 4], moe_layers - 1, executions)
    assert (chosen, reason) == (run.chosen, run.reason)
    assert tried == {m: ts[0] for m, ts in run.layer_seconds.items() if ts}
    assert cost == pytest.approx(run.cost_s, abs=0.01)          # the run adds its syncs
