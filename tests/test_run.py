"""End-to-end `mpiexec -n K moempi run` against the float64 reference, at K = 1, 2, 3, 4 and 16."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest

from conftest import moempi, mpirun, reference
from reference import rel_l2

EXACT = 1e-4          # fp32 mode vs float64 reference (docs/design.md §1)
SAME = 1e-5           # any two fp32 runs: overlap on/off, any micro-batch count
DEEP_SAME = 2e-6      # two micro-batch counts at 61 layers (the test model: measured <= 9.4e-7)
BF16_WIRE = 3e-2      # bf16 mode vs float64 on the 6-layer test model (measured: ~1e-2)


def hidden(path):
    with h5py.File(path, "r") as f:
        return f["hidden"][()]


def run(files, tmp_path, n, model="e4.h5", tokens="tok.h5", *extra, name="out.h5"):
    out = tmp_path / name
    proc = mpirun(n, "run", "--model", files / model, "--tokens", files / tokens,
                  "--output", out, *extra)
    return out, proc


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_matches_reference_across_modes(files, tmp_path, n):
    """fp32 output equals the reference at every size, overlapped or not, any micro-batch count."""
    ref = reference(files / "e4.h5", files / "tok.h5")
    outs = {}
    for label, extra in {"blocking": ["--no-overlap"],
                         "m1": ["--micro-batches", "1"],
                         "m3": ["--micro-batches", "3"],
                         "auto": []}.items():
        path, _ = run(files, tmp_path, n, "e4.h5", "tok.h5", *extra, name=f"{label}.h5")
        outs[label] = hidden(path)
        assert rel_l2(outs[label], ref) <= EXACT, label
    labels = list(outs)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            assert rel_l2(outs[a], outs[b]) <= SAME, (a, b)


@pytest.mark.parametrize("n,micro", [(2, 2), (3, 5)])
def test_many_small_micro_batches_through_61_layers(files, tmp_path, n, micro):
    """Tiny batches, many micro-batches in flight, 61 layers: the schedule never stalls.

    (Polling MPI during one micro-batch's compute completes others' requests; the scheduler
    must still resume those micro-batches: a deadlock here once hung the job.)
    """
    ref = reference(files / "deep.h5", files / "tok.h5")
    path, _ = run(files, tmp_path, n, "deep.h5", "tok.h5", "--micro-batches", str(micro),
                  "--set", "pipeline.batch_tokens=8")
    assert rel_l2(hidden(path), ref) <= EXACT


def test_same_configuration_bit_identical_and_micro_batch_counts_agree(files, tmp_path):
    """61 layers: one configuration run twice gives the same bits, whatever the expert GEMMs'
    chunking (timing-dependent: chunks only while exchanges are in flight, of a measured
    size that is a multiple of the BLAS's row quantum; 8 rows are rounded up to it: with
    pieces of 8 rows this test once failed); other micro-batch counts agree to DEEP_SAME
    (the README's figure)."""
    outs = {}
    for label, micro, chunk in (("m3", 3, 0), ("m3 again", 3, 0), ("m3 chunks of 8", 3, 8),
                                ("m3 no chunks", 3, 10**6), ("m1", 1, 0), ("m5", 5, 0)):
        path, _ = run(files, tmp_path, 2, "deep.h5", "tok.h5", "--micro-batches", str(micro),
                      "--set", f"pipeline.chunk_rows={chunk}",
                      name=f"{label.replace(' ', '_')}.h5")
        outs[label] = hidden(path)
        with h5py.File(path) as f:
            tuning = json.loads(f.attrs["tuning"])
        if chunk and chunk < 10**6:      # a given chunk is rounded up to the BLAS's row quantum
            assert tuning["chunk_rows"] % tuning["row_quantum"] == 0
            assert tuning["chunk_rows"] >= chunk
    for same in ("m3 again", "m3 chunks of 8", "m3 no chunks"):
        assert np.array_equal(outs["m3"], outs[same]), same
    for other in ("m1", "m5"):
        assert rel_l2(outs[other], outs["m3"]) <= DEEP_SAME, other


def test_ep16_oversubscribed(files, tmp_path):
    """16 ranks, 16 experts, one per rank (EP=16) on 2 cores, overlapped with 2 micro-batches."""
    ref = reference(files / "e16.h5", files / "tok.h5")
    path, proc = run(files, tmp_path, 16, "e16.h5", "tok.h5", "--micro-batches", "2",
                     "--save-routing")
    assert rel_l2(hidden(path), ref) <= EXACT
    with h5py.File(path, "r") as f:
        assert f.attrs["world_size"] == 16
        dest = f["routing/003/dest_rank"][()]
        idx = f["routing/003/topk_idx"][()]
        assert (dest == idx).all()          # expert e lives on rank e
        traffic = f["stats/traffic"][()]
        assert traffic.shape == (3, 16, 16)
        assert traffic.sum() == 300 * 2 * 3  # every (token, expert) pair sent once per layer
    blocking, _ = run(files, tmp_path, 16, "e16.h5", "tok.h5", "--no-overlap", name="b.h5")
    assert rel_l2(hidden(blocking), hidden(path)) <= SAME


def test_float32_model_and_bf16_tokens(files, tmp_path):
    ref = reference(files / "f32.h5", files / "tok_bf16.h5")
    path, _ = run(files, tmp_path, 3, "f32.h5", "tok_bf16.h5")
    assert rel_l2(hidden(path), ref) <= EXACT


def test_bf16_wire_bound(files, tmp_path):
    ref = reference(files / "e4.h5", files / "tok.h5")
    path, _ = run(files, tmp_path, 2, "e4.h5", "tok.h5", "--precision", "bf16")
    err = rel_l2(hidden(path), ref)
    assert 1e-5 < err <= BF16_WIRE         # rounded on the wire, but bounded


def test_replicas_split_tokens(files, tmp_path):
    """4 ranks, 3 experts: rank 3 holds a replica of expert 0 and takes about half its tokens."""
    ref = reference(files / "e3.h5", files / "tok.h5")
    path, _ = run(files, tmp_path, 4, "e3.h5", "tok.h5", "--save-routing")
    assert rel_l2(hidden(path), ref) <= EXACT
    with h5py.File(path, "r") as f:
        per_rank = f["stats/tokens_per_rank"][()]       # [L_moe, P]
        assert abs(int(per_rank[:, 0].sum()) - int(per_rank[:, 3].sum())) <= 4 * per_rank.shape[0]
        for l in f["stats/moe_layers"][()]:
            idx, dest = f[f"routing/{l:03d}/topk_idx"][()], f[f"routing/{l:03d}/dest_rank"][()]
            assert set(np.unique(dest[idx == 0])) == {0, 3}
            assert (dest[idx == 1] == 1).all() and (dest[idx == 2] == 2).all()


def test_placement_json(files, tmp_path):
    """A user placement moves experts between ranks; the math does not change."""
    placement = {"format": "moempi-placement", "version": 1, "num_ranks": 2, "num_experts": 4,
                 "layers": {"2": [[1], [0], [1], [0]], "4": [[0], [1], [1], [0]]}}
    pfile = tmp_path / "p.json"
    pfile.write_text(json.dumps(placement))
    ref = reference(files / "e4.h5", files / "tok.h5")
    path, proc = run(files, tmp_path, 2, "e4.h5", "tok.h5", "--placement", pfile,
                     "--set", "parallel.allow_packing=true", "--save-routing")
    assert rel_l2(hidden(path), ref) <= EXACT
    assert (f"warning: placement {pfile} lists no hosts for MoE layer(s) 1, 3, 5: they use "
            "the default placement") in proc.stdout
    with h5py.File(path, "r") as f:
        idx, dest = f["routing/002/topk_idx"][()], f["routing/002/dest_rank"][()]
        assert (dest == np.array([1, 0, 1, 0])[idx]).all()


def test_telemetry_recorded(files, tmp_path):
    # every layer replayed (a 3-MoE-layer job's default sample is empty: test_replay.py)
    path, proc = run(files, tmp_path, 2, "e4.h5", "tok.h5", "--micro-batches", "2",
                     "--set", "pipeline.pure_comm_layers=all")
    with h5py.File(path, "r") as f:
        for name in ("gate", "dispatch", "expert", "combine", "compute", "wait", "overall",
                     "pure_comm", "overlap"):
            assert f[f"timings/{name}"].shape == (2, 6), name
        overall, compute = f["timings/overall"][()], f["timings/compute"][()]
        assert (overall[:, 1:] >= compute[:, 1:] - 1e-6).all()
        assert (f["timings/pure_comm"][()][:, 1:] > 0).all()
        assert f["stats/tokens_per_expert"][()].sum() == 300 * 2 * 5
        cfg = json.loads(f.attrs["config"])
        assert cfg["pipeline"]["micro_batches"] == 2 and f.attrs["micro_batches"] == 2
        assert "mpi" in json.loads(f.attrs["versions"])
        # self-describing: meaning and units, and HDF5 dimension scales on the named axes
        assert "input token order" in f["hidden"].attrs["description"]
        assert [d.label for d in f["hidden"].dims] == ["token", "hidden"]
        assert f["timings/wait"].attrs["units"] == "s" and f["timings/wait"].attrs["description"]
        scales = {"timings/overlap": ["/axes/rank", "/axes/layer"],
                  "stats/tokens_per_expert": ["/stats/moe_layers", "/axes/expert"],
                  "stats/traffic": ["/stats/moe_layers", "/axes/rank", "/axes/rank"],
                  "balance/bias": ["/axes/batch", "/stats/moe_layers", "/axes/expert"]}
        for name, expected in scales.items():
            assert [d[0].name for d in f[name].dims] == expected, name
        assert list(f["axes/layer"][()]) == list(range(6))
    assert "wrote" in proc.stdout
    shown = moempi("inspect", path).stdout
    assert "max over ranks" in shown and "    0 dense" in shown and "    1   moe" in shown


def test_batch_tokens_bounds_host_memory(tmp_path):
    """Each batch's rows go to the output file as it completes: a rank's peak memory does not
    grow with its shard (2 ranks, 64 MiB of output rows per rank at 8x the tokens)."""
    moempi("init-model", tmp_path / "m.h5", "--preset", "tiny", "--hidden", "1024", "--ffn", "16",
           "--dense-ffn", "16", "--layers", "2", "--dense-layers", "1")
    peaks = {}
    for n in (4096, 32768):
        moempi("make-tokens", tmp_path / "t.h5", "-n", n, "--hidden", "1024", "--overwrite",
               timeout=120)
        out, _ = run(tmp_path, tmp_path, 2, "m.h5", "t.h5", "--micro-batches", "1",
                     "--set", "pipeline.batch_tokens=512", name=f"out{n}.h5")
        with h5py.File(out, "r") as f:
            peaks[n] = f["stats/peak_host_bytes"][()]
            assert f["stats/peak_host_bytes"].attrs["units"] == "bytes"
        out.unlink()
    growth = (peaks[32768] - peaks[4096]).max() / 2**20
    # rows held to the end would add 56 MiB per rank; one batch in flight adds none
    assert growth < 16, f"peak host memory grew by {growth:.0f} MiB per rank: {peaks}"


def test_inspect_explains_the_overlap(files, tmp_path):
    """`inspect` says why the overlap is what it is, in words a user acts on, and shows no
    NaN: a dense layer's overlap is not applicable.  (4 ranks: on a machine with fewer
    cores, that they share them is one of the reasons.)"""
    import os
    path, _ = run(files, tmp_path, 4, "e4.h5", "tok.h5", "--micro-batches", "1",
                  "--set", "pipeline.pure_comm_layers=all")
    shown = moempi("inspect", path).stdout
    assert "nan" not in shown.lower()
    assert re.search(r"^    0 dense .* n/a$", shown, re.M)
    why = shown[shown.index("why the overlap is what it is:"):]
    assert "- one micro-batch:" in why and "--micro-batches 2 or more" in why
    assert re.search(r"- the exchanges alone take [0-9.]+ s against [0-9.]+ s of compute", why)
    with h5py.File(path, "r") as f:
        node = json.loads(f.attrs["node"])
    assert node["ranks"] == 4 and node["cores"] == len(os.sched_getaffinity(0))
    assert ("4 ranks shared" in why) == (node["cores"] < 4)
    blocking, _ = run(files, tmp_path, 2, "e4.h5", "tok.h5", "--no-overlap", name="b.h5")
    assert "were blocking (pipeline.overlap = false)" in moempi("inspect", blocking).stdout
