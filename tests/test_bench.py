"""`moempi bench` runs end to end (small shapes) and prints every ratio it promises."""

from __future__ import annotations

import json
import re

from conftest import moempi, mpirun


def ratios(text, label):
    return [float(x) for x in re.findall(rf"{label} ([0-9.]+)", text)]


def test_bench_all_quick(tmp_path):
    cal = tmp_path / "cal.json"
    proc = mpirun(2, "bench", "all", "--quick", "--tokens", "128", "--micro-batches", "2",
                  "--calibration", cal, timeout=300)
    out = proc.stdout
    assert len(ratios(out, "-> ratio")) == 3                     # expert, exchange fp32 and bf16
    assert all(0 < r < 5 for r in ratios(out, "-> ratio"))
    assert len(ratios(out, "overlapped/blocking")) == 2          # real and comm-heavy shapes
    assert "overlap" in out and "(OSU" in out
    # the micro-batch choice against every fixed count, at both shapes: the auto count is one
    # of the timed ones and the ratios are those of the printed times
    # (the auto pass, trial layers included, may beat the best fixed count's best by noise)
    found = re.findall(r"auto (\d+) \(the whole pass with its trial layers ([0-9.]+) ms, the "
                       r"tuning's cost ([0-9.]+) ms: [^)]*\), best fixed (\d+) \(([0-9.]+) ms\) "
                       r"-> auto/best ([0-9.]+)", out)
    assert len(found) == 2
    for m in found:
        auto_ms, cost_ms, best_ms, ratio = float(m[1]), float(m[2]), float(m[4]), float(m[5])
        assert 0 <= cost_ms <= auto_ms
        assert (auto_ms - 0.05) / (best_ms + 0.05) - 1e-3 <= ratio <= \
            (auto_ms + 0.05) / max(best_ms - 0.05, 1e-9) + 1e-3
    assert len(ratios(out, "auto/best")) == 2
    assert len(re.findall(r"over the plain-GEMM floor \([0-9.]+ ms\) ([0-9.]+)", out)) == 2
    # the gap is explained by measurement: each exchange's bound from its local steps' bytes
    # at the copy rate (a ratio can only approach it), and the layer's time by part
    measured, bounds = ratios(out, "-> ratio")[1:], ratios(out, "can reach at most")
    assert len(bounds) == 2 and all(0 < b < 1 for b in bounds)
    for m in re.finditer(r"fastest of 3 more passes at \d+: ([0-9.]+) ms\): expert ([0-9.]+) ms, "
                         r"gate ([0-9.]+) ms, exchange local work ([0-9.]+) ms, MPI calls "
                         r"([0-9.-]+) ms, waiting on exchanges ([0-9.]+) ms", out):
        total, pieces = float(m[1]), [float(v) for v in m.groups()[1:]]
        assert 0.6 * total <= sum(pieces) <= total * 1.01 + 0.5   # (fixed costs at tiny shapes)
    assert out.count("where it goes") == 2
    # every target is printed with its verdict, which agrees with the figure, and a target
    # not met says why with a measurement
    verdicts = re.findall(r"target ([a-z/]+ )?(>=|<=) ([0-9.]+)[^:]*: (met|not met: .+)", out)
    exchange = [v[1:] for v in verdicts if v[1] == ">="]
    auto = [v[1:] for v in verdicts if v[0] == "auto/best "]
    layer = [v[1:] for v in verdicts if v[0] == "layer/floor "]
    assert len(exchange) == 2 and len(auto) == 2 and len(layer) == 2
    for (_, target, said), ratio in zip(exchange, measured):
        assert (said == "met") == (ratio >= float(target))
        if said != "met":        # the local steps took longer than the target leaves them
            leaves, took = re.search(r"([0-9.]+) x their bytes at the copy rate; they took "
                                     r"([0-9.]+) x", said).groups()
            assert float(took) >= float(leaves) - 0.01
    for (_, target, said), ratio in zip(auto, ratios(out, "auto/best")):
        assert (said == "met") == (ratio <= float(target)) and (said == "met" or "spread" in said)
    floors = re.findall(r"over the plain-GEMM floor \([0-9.]+ ms\) ([0-9.]+)", out)
    for (_, target, said), ratio in zip(layer, floors):
        assert (said == "met") == (float(ratio) <= float(target))
        if said != "met":
            assert re.search(r"the expert took [0-9.]+ x the floor, .* GEMMs\) [0-9.]+ x, "
                             r"waiting [0-9.]+ x; the exchange's copies alone", said)
    data = json.loads(cal.read_text())
    assert data["format"] == "moempi-calibration" and data["gemm_flops"] > 0
    # the compiled local steps were loaded, and numpy's timed beside them
    assert "local steps compiled (numba)" in out and out.count("numpy's steps") == 2


def test_bench_job_quick(tmp_path):
    """Whole jobs launched as a user does: the wall time over the layers' GEMM floors, its
    parts (which fit inside it), the automatic count against fixed ones, each target's
    verdict agreeing with its figure."""
    proc = moempi("bench", "job", "--quick", cwd=tmp_path, timeout=300)
    out = proc.stdout
    m = re.search(r"the whole `mpiexec moempi run` ([0-9.]+) s \(best of \d+\) over the sum of "
                  r"its layers' plain-GEMM floors ([0-9.]+) s \(MoE [0-9.]+, dense [0-9.]+\) -> "
                  r"([0-9.]+)", out)
    assert m, out
    wall, floor, ratio = map(float, m.groups())
    assert wall > 0 and 0 < floor < wall and ratio > 1
    parts = re.search(r"launch, imports, output and exit ([0-9.]+) s; start-up ([0-9.]+) s .*"
                      r"tuning ([0-9.]+) ms .* forward ([0-9.]+) s .* replay ([0-9.]+) s", out)
    outside, startup, tuning_ms, forward, replay = map(float, parts.groups())
    assert startup + tuning_ms / 1e3 + forward + replay <= wall + 0.02
    assert outside > 0
    auto = ratios(out, "auto/best")
    said = re.search(r"target auto/best <= 1.03: (met|not met: .*)", out)[1]
    assert (said == "met") == (round(auto[0], 3) <= 1.03)
    assert re.search(r"target tuning <= 2% of the forward: (met|not met)", out)
    replay = re.search(r"target replay for the overlap % <= 2% of the forward: (met \(([0-9.]+)%"
                       r"|not met: ([0-9.]+)%)", out)
    share = float(replay[2] or replay[3])
    assert (replay[1].startswith("met")) == (share <= 2.0)
    assert (tmp_path / "work" / "bench-job").is_dir()


def test_bench_node_and_tp_quick():
    """The node-dispatch table (2 nodes of 4 ranks): co-activating routing crosses nodes
    half as often; and the tensor-parallel sum's two costs."""
    proc = mpirun(8, "bench", "node", "--quick", timeout=300)
    rows = re.findall(r"\| 2 x 4 \| ([a-z-]+) \| (\d+) / (\d+) \|", proc.stdout)
    assert [r[0] for r in rows] == ["skewed", "co-activating"]
    for routing, direct, node in rows:
        assert int(node) <= int(direct)
    _, direct, node = rows[1]
    assert int(node) <= 0.6 * int(direct)
    proc = mpirun(4, "bench", "tp", "--quick", timeout=120)
    assert len(ratios(proc.stdout, "combine/reduce")) == 1


def test_bench_balance_quick():
    proc = mpirun(4, "bench", "balance", "--quick", timeout=300)
    m = re.search(r"MaxVio off ([0-9.]+) -> ([0-9.]+), on ([0-9.]+) -> ([0-9.]+)", proc.stdout)
    off0, off1, on0, on1 = map(float, m.groups())
    assert on1 < 0.8 * on0 and off1 > 0.8 * off0


def test_bench_place_quick():
    proc = moempi("bench", "place", "--quick", timeout=120)
    assert "locality" in proc.stdout


def test_bench_calibrate_writes_what_plan_takes(tmp_path):
    """The runner's calibration through `moempi bench`, a second process added (medians),
    and `plan --hardware` on the file."""
    from moempi.perf.analytic import Calibration
    cal = tmp_path / "cal.json"
    mpirun(2, "bench", "calibrate", "--calibration", cal, timeout=120)
    mpirun(2, "bench", "calibrate", "--calibration", cal, "--add", timeout=120)
    c = Calibration.load(str(cal))
    assert [row[0] for row in c.alltoall] == [2] and c.gemm_flops > 0
    assert dict(c.samples)[2] and len(dict(c.samples)[2]) == 2 and c.cpu
    proc = moempi("plan", "--hardware", cal, "--ep", 2, "--tokens-per-gpu", 256)
    assert "forward" in proc.stdout
    missing = mpirun(2, "bench", "calibrate", check=False, timeout=60)
    assert missing.returncode != 0 and "give --calibration FILE" in missing.stderr


def test_bench_full_quick():
    """One layer of the full DeepSeek-V3 preset's kind (gated experts packed, top-8 in groups,
    shared expert) through the real code path, against its floor; its parts fit its time."""
    out = mpirun(2, "bench", "full", "--quick", timeout=300).stdout
    m = re.search(r"16 of its 256 experts packed 8 per rank, top-8 in 4 of 8 groups, shared "
                  r"expert of \d+, 64 tokens/rank, 2 ranks, fp32\): ([0-9.]+) ms vs its "
                  r"plain-GEMM floor ([0-9.]+) ms -> ([0-9.]+)", out)
    assert m, out
    layer, floor, ratio = map(float, m.groups())
    # the ratio is of the unrounded times: within what the printed 0.1 ms allow
    assert 0 < floor and (layer - 0.05) / (floor + 0.05) - 1e-3 <= ratio <= \
        (layer + 0.05) / max(floor - 0.05, 1e-9) + 1e-3
    parts = re.search(r"\((\d+) routed rows \+ 64 shared\): expert ([0-9.]+) ms .* gate "
                      r"([0-9.]+) ms, exchange local work ([0-9.-]+) ms, waiting on exchanges "
                      r"([0-9.]+) ms", out)
    rows, *pieces = parts.groups()
    assert int(rows) >= 64 * 8 * 2 // 2 * 0.5       # about tokens x top-8 per rank
    assert sum(map(float, pieces)) <= layer * 1.05 + 0.5


def test_bench_job_refuses_to_run_under_mpiexec(tmp_path):
    """Under mpiexec every rank would launch the same jobs: one line, non-zero exit."""
    proc = mpirun(2, "bench", "job", "--quick", cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode != 0 and "run it without mpiexec" in proc.stderr
    assert not (tmp_path / "work").exists()
