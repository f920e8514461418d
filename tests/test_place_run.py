"""`moempi place` end to end: trace -> placement -> run; math unchanged, traffic as predicted."""

from __future__ import annotations

import json

import h5py

from conftest import moempi, mpirun, reference
from reference import rel_l2


def test_placement_from_trace_runs_and_matches_prediction(files, tmp_path):
    topo = tmp_path / "topo.toml"
    topo.write_text("[topology]\nnodes = 2\ngpus_per_node = 2\ngpu_memory_gb = 1.0\n")
    trace, placed = tmp_path / "trace.h5", tmp_path / "placed.h5"
    common = ["--model", files / "e3.h5", "--tokens", files / "tok.h5", "--micro-batches", "2"]
    mpirun(4, "run", *common, "--output", trace, "--save-routing")
    pfile = tmp_path / "placement.json"
    proc = moempi("place", "--topology", topo, "--model", files / "e3.h5", "--trace", trace,
                  "-o", pfile)
    placement = json.loads(pfile.read_text())
    assert placement["num_ranks"] == 4 and placement["objective"]
    assert "contiguous" in proc.stdout.lower() and "eplb" in proc.stdout.lower()
    mpirun(4, "run", *common, "--output", placed, "--placement", pfile, "--save-routing")
    ref = reference(files / "e3.h5", files / "tok.h5")
    with h5py.File(placed, "r") as f:
        assert rel_l2(f["hidden"][()], ref) <= 1e-4           # placement never changes the math
        hosts = {int(k): v for k, v in placement["layers"].items()}
        for l, per_expert in hosts.items():
            idx, dest = f[f"routing/{l:03d}/topk_idx"][()], f[f"routing/{l:03d}/dest_rank"][()]
            for e, ranks in enumerate(per_expert):
                assert set(dest[idx == e].tolist()) <= set(ranks)
    # the run's measured per-link counts equal the placement's prediction on the same tokens
    check = moempi("place", "--topology", topo, "--compare-run", placed, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    evaluated = moempi("place", "--topology", topo, "--trace", placed, "--evaluate", pfile)
    assert evaluated.returncode == 0
