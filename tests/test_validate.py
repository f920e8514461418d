"""Issues 8.4 and 26: the time model, calibrated on this machine, predicts real local runs.

What is compared.  For each configuration (2 ranks; 4 ranks with direct dispatch, with
tensor parallelism tp 2, and with node dispatch on 2 nodes of 2; two shapes; overlap on
and off) the prediction of ``measure.validate.predict_runs`` (``perf.predict.forecast_job``:
the run's own ranks, tp, dispatch, tokens per rank, micro-batches, precision, overlap and
its measured rows moved and computed per rank) is compared with the run's
``/timings/overall`` per layer (slowest rank), and printed as a table with each layer's
error and the model term that dominates it.  The assertion is on the **mean over the MoE
layers of the per-layer relative error** |predicted / measured - 1|: within 15 %, or within
the run-to-run spread this machine measured for that configuration (the table names it,
and the warm-up of a fresh process's first layers, as what the model has no term for);
never beyond 25 %, nor the whole forward.  The mean over layers rather than the worst
layer: with overlap on, micro-batches run ahead into the next layer without a barrier, so
a rank's time moves between neighbouring layers (the sum is exact, the split is not).

Noise.  ``REPEATS`` rounds, each a calibration process at 2 and 4 ranks (``--add``: each
figure the median over the rounds; real-runner runs at a third shape, H 768, F 512, and
one cold first pass) and then every configuration once; the median per layer counts.
Nothing is fitted on the runs compared.
The test can fail: ``test_wrong_hardware_is_caught`` shows a calibration with a 2x GEMM rate
is rejected by the same check.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

# timing-sensitive: `make validate` runs it on an otherwise idle machine, `make test` does not
pytestmark = pytest.mark.validate
from click.testing import CliRunner

from conftest import moempi, mpirun
from moempi.perf.analytic import Calibration, Hardware, Layout, forward_time
from moempi.measure.validate import TOLERANCE, format_table, predict_runs, summarize
from moempi.cli.plan import plan
from moempi.model.shapes import PRESETS
from moempi.io.topology import Topology

SHAPES = {"h512-f1024": (512, 1024), "h1024-f256": (1024, 256)}
CEILING = 0.25                 # the bound before issue 26, still held in every case
REPEATS = 5                    # rounds: calibration at 2 and 4 ranks, then every configuration
TOKENS = 1024                  # 512 / 256 tokens per rank: 20-60 ms per MoE layer here
# (ranks, variant): direct dispatch at 2 and 4 ranks; at 4 ranks also tensor parallelism
# (tp 2: 2 slots of 2 shards) and node dispatch (2 nodes of 2 ranks)
VARIANTS = [(2, "direct"), (4, "direct"), (4, "tp2"), (4, "node")]
CONFIGS = [(p, v, s, ov) for p, v in VARIANTS for s in SHAPES for ov in (True, False)]
RANKS = sorted({p for p, _ in VARIANTS})


def _variant_args(d, variant: str, ranks: int) -> list:
    if variant == "tp2":
        return ["--set", "parallel.tp=2", "--set", "parallel.allow_packing=true"]
    if variant == "node":
        from moempi.place.placement import Placement
        data = Placement.default(4, ranks, range(1, 5)).to_dict()
        data["topology"] = {"nodes": ranks // 2, "gpus_per_node": 2}
        path = d / f"nodes-{ranks}x2.json"
        path.write_text(json.dumps(data))
        return ["--placement", path, "--set", "pipeline.dispatch=node"]
    return []


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """REPEATS rounds, each: a calibration process at 2 and at 4 ranks (``--add``: the
    figures are the medians over the rounds), then every configuration once; so the
    calibration and the runs it predicts share the machine's moods."""
    d = tmp_path_factory.mktemp("validate")
    cal = d / "cal.json"
    for name, (hidden, ffn) in SHAPES.items():
        moempi("init-model", d / f"{name}.h5", "--preset", "tiny", "--hidden", hidden, "--ffn",
               ffn, "--layers", 5, "--dense-layers", 1, "--experts", 4, "--seed", 7)
        moempi("make-tokens", d / f"{name}-tok.h5", "-n", TOKENS, "--model", d / f"{name}.h5",
               "--seed", 8)
    outputs = {c: [] for c in CONFIGS}
    for rep in range(REPEATS):
        for p in RANKS:
            mpirun(p, "bench", "calibrate", "--calibration", cal, *(["--add"] if rep else []))
        for p, variant, name, overlap in CONFIGS:
            out = d / f"{name}-{p}-{variant}-{'ov' if overlap else 'block'}-{rep}.h5"
            extra = ["--micro-batches", 4] if overlap else ["--no-overlap"]
            mpirun(p, "run", "--model", d / f"{name}.h5", "--tokens", d / f"{name}-tok.h5",
                   "--output", out, *extra, *_variant_args(d, variant, p))
            outputs[(p, variant, name, overlap)].append(str(out))
    return Calibration.load(str(cal)), outputs, cal


@pytest.mark.parametrize("ranks,variant,shape,overlap", CONFIGS,
                         ids=[f"{p}ranks-{v}-{s}-{'overlap' if o else 'blocking'}"
                              for p, v, s, o in CONFIGS])
def test_prediction_within_tolerance(measured, ranks, variant, shape, overlap):
    cal, outputs, _ = measured
    rows = predict_runs(outputs[(ranks, variant, shape, overlap)], cal)
    s = summarize(rows)
    print("\n" + format_table(rows))
    assert rows[1]["micro_batches"] == (4 if overlap else 1)
    assert rows[1]["tp"] == (2 if variant == "tp2" else 1)
    assert rows[1]["dispatch"] == ("node" if variant == "node" else "direct")
    # within 15 %, or within what this machine reproduces of itself (the spread of the
    # repeats, named in the table); never beyond the earlier 25 %
    assert s["mean_layer_error"] <= max(TOLERANCE, s["spread"]), format_table(rows)
    assert s["mean_layer_error"] <= CEILING and abs(s["forward_error"]) <= CEILING, \
        format_table(rows)


def test_calibration_is_the_median_of_its_processes(measured):
    cal = measured[0]
    samples = dict(cal.samples)
    for (n, *cpu), (n_, *alltoall) in zip(cal.cpu, cal.alltoall):
        assert n == n_ and len(samples[n]) == REPEATS
        assert (*alltoall, *cpu) == pytest.approx(tuple(np.median(samples[n], axis=0)))


def test_wrong_hardware_is_caught(measured):
    """The same check fails for a machine description off by 2x in GEMM rate."""
    cal, outputs, _ = measured
    fast = dataclasses.replace(cal, cpu=tuple((n, 2 * f, *rest) for n, f, *rest in cal.cpu))
    rows = predict_runs(outputs[(2, "direct", "h512-f1024", False)], fast)
    assert summarize(rows)["mean_layer_error"] > TOLERANCE


def test_plan_validate_cli(measured, tmp_path):
    _, outputs, cal = measured
    files = outputs[(4, "direct", "h1024-f256", True)]
    args = ["--hardware", str(cal), "--json", str(tmp_path / "v.json")]
    for f in files:
        args += ["--validate", f]
    out = CliRunner().invoke(plan, args, catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert f"median of {REPEATS} runs" in out.output and "moe 4" in out.output and "forward:" in out.output
    assert (tmp_path / "v.json").exists()
    bad = CliRunner().invoke(plan, ["--validate", files[0]])
    assert bad.exit_code != 0 and "needs --hardware" in bad.output


def test_cpu_terms_roundtrip_and_default_zero(tmp_path):
    cal = Calibration.from_measurements(5e10, {2: (1e-5, 3e9), 4: (4e-5, 3e9)}, "vm",
                                        cpu={2: (8e10, 2e10, 1e-8, 1e-4),
                                             4: (4e10, 1e10, 2e-8, 2e-4)})
    cal.save(str(tmp_path / "c.json"))
    back = Calibration.load(str(tmp_path / "c.json"))
    assert back == cal
    hw = back.hardware(4, Topology(nodes=1, gpus_per_node=4))
    assert (hw.gemm_flops, hw.weight_Bps, hw.micro_batch_s) == (4e10, 1e10, 2e-4)
    # a file without cpu rows: no CPU terms, the old meaning
    plain = Calibration.from_measurements(5e10, {2: (1e-5, 3e9)}, "vm")
    assert plain.hardware(2, Topology()).micro_batch_s == 0.0
    # seed hardware: the new terms are 0, so DeepSeek-V3 figures are the documented ones
    seed = Hardware.from_topology(Topology())
    assert seed.weight_Bps == seed.token_elem_s == seed.micro_batch_s == 0.0
    assert seed.first_touch_s == seed.dense_elem_s == seed.dense_touch_s == 0.0
    fc = forward_time(PRESETS["deepseek-v3"], seed, Layout(ep=256, micro_batches=3))
    assert fc.forward_s * 1e3 == pytest.approx(192.5, abs=0.05)
