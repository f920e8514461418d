"""The `moempi run` output file, written batch by batch (docs/design.md §2.3).

Rank 0 opens the file under a temporary name before the forward pass.  After each batch
every rank's rows of that batch (after the final norm) and, when saved, their routing go
straight into it, so no rank holds more than one batch of output and ``pipeline.batch_tokens``
bounds the host memory of the whole run.  A resumed run copies the batches its checkpoint
holds first.  The timings, counters and attributes follow at the end; :meth:`OutputFile.finish`
publishes the file, :meth:`OutputFile.discard` (or any failure or signal) removes it, so an
output file is complete or absent.
"""

from __future__ import annotations

import resource
import sys

import numpy as np
from mpi4py import MPI

from moempi import __version__
from moempi.io import hdf5
from moempi.model.balance import max_violation
from moempi.model.experts import rmsnorm
from moempi.runtime import parallel
from moempi.runtime.pipeline import TIMINGS

# what each /timings dataset measures, per rank and layer (stored as its description)
TIMING_MEANING = {
    "gate": "norm, gating and routing", "dispatch": "dispatch exchanges, posting to completion",
    "expert": "expert MLP compute (the dense MLP in dense layers)",
    "pack": "gathering, BF16 rounding and widening exchange buffers",
    "compute": "all local work of the layer (everything but MPI calls and waiting)",
    "combine": "combine exchanges, posting to completion",
    "wait": "time blocked waiting for the layer's exchanges",
    "busy": "time running the layer's code, MPI calls included",
    "overall": "busy + wait: the layer's wall time on this rank",
    "pure_comm": "the layer's exchanges replayed alone, without compute",
}


def overlap_percent(overall, compute, pure_comm):
    """OSU definition: ``max(0, 100 (1 - (overall - compute) / pure_comm))``; NaN without comm."""
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = 100.0 * (1.0 - (overall - compute) / pure_comm)
    return np.where(pure_comm > 0, np.maximum(pct, 0.0), np.nan)


def peak_host_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def versions() -> dict:
    import h5py
    import mpi4py
    return {"moempi": __version__, "python": sys.version.split()[0], "numpy": np.__version__,
            "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
            "mpi4py": mpi4py.__version__,
            "mpi": MPI.Get_library_version().splitlines()[0].strip()}


def write_prediction(writer, prediction) -> None:
    """``/timings/predicted`` and the prediction's root attributes (or why there is none)."""
    writer.attrs(**prediction.attrs)
    if prediction.seconds is None:
        return
    writer.array("timings/predicted", prediction.seconds, units="s", dims="layer",
                 description="the time model's prediction of each layer's wall time over the "
                             "whole job, at this run's configuration and measured routing "
                             "(compare: /timings/overall, max over ranks)",
                 source=prediction.attrs["prediction_source"])


class OutputFile:
    """The output file of one run; every method is called on every rank.

    ``shard_start`` is this rank's first token row; ``final_norm`` the model's final norm
    weights on the host (None: the model has none); ``save_routing`` adds ``/routing``.
    """

    def __init__(self, world, path: str, overwrite: bool, meta, num_tokens: int,
                 shard_start: int, final_norm, save_routing: bool):
        self.world, self.meta, self.final_norm = world, meta, final_norm
        self.starts = world.gather(shard_start, root=0)
        self.writer, self.datasets = None, {}
        if world.rank == 0:
            self.writer = w = hdf5.OutputWriter(path, overwrite)
            H, K = meta.hidden_size, meta.top_k
            self.datasets["hidden"] = w.dataset(
                "hidden", (num_tokens, H), "f4", dims="token, hidden",
                description="the stack's output (after the final norm, if the model has one), "
                            "rows in the input token order", units="as /tokens")
            if save_routing:
                self.datasets["home"] = w.dataset(
                    "routing/home_rank", (num_tokens,), "i4", dims="token",
                    description="the rank that owned the token")
                for m, layer in enumerate(meta.moe_layers):
                    for name in ("topk_idx", "dest_rank"):
                        self.datasets[m, name] = w.dataset(
                            f"routing/{layer:03d}/{name}", (num_tokens, K), "i4",
                            dims="token, k")

    def _normed(self, rows: np.ndarray) -> np.ndarray:
        if self.final_norm is None:
            return rows
        return rmsnorm(rows, self.final_norm, self.meta.norm_eps)

    def batch(self, lo: int, rows: np.ndarray, routing: dict | None) -> None:
        """This rank's rows of one batch, from shard row ``lo``: the residual stream before
        the final norm, and ``routing`` (MoE layer -> (topk_idx, dest_rank)) or None."""
        los = self.world.gather(lo, root=0)
        starts = [s + l for s, l in zip(self.starts, los)] if self.writer else None
        ds = self.datasets
        parallel.stream_rows_to_dataset(self.world, self._normed(rows), ds.get("hidden"), starts)
        if routing is None:
            return
        home = np.full(len(rows), self.world.rank, dtype=np.int32)
        parallel.stream_rows_to_dataset(self.world, home, ds.get("home"), starts)
        for m, arrays in routing.items():
            for name, arr in zip(("topk_idx", "dest_rank"), arrays):
                parallel.stream_rows_to_dataset(self.world, arr, ds.get((m, name)), starts)

    def restored(self, rank: int, lo: int, rows: np.ndarray, routing: dict | None) -> None:
        """Rank 0: rank ``rank``'s rows of a batch its checkpoint holds (as :meth:`batch`)."""
        first = self.starts[rank] + lo
        span = slice(first, first + len(rows))
        self.datasets["hidden"][span] = self._normed(rows)
        if routing is not None:
            self.datasets["home"][span] = rank
            for m, arrays in routing.items():
                for name, arr in zip(("topk_idx", "dest_rank"), arrays):
                    self.datasets[m, name][span] = arr

    def finish(self, attrs: dict, tel, pure_comm: np.ndarray, history: dict,
               gpus_per_node: int = 0, forecast=None):
        """Gather the timings and counters, write them with ``attrs`` and publish the file.

        ``forecast`` (a :class:`moempi.runtime.prediction.RunForecast`, or None) adds the time
        model's prediction from the gathered routing; returns its
        :class:`~moempi.runtime.prediction.Prediction` on rank 0, None elsewhere."""
        world, meta, writer = self.world, self.meta, self.writer
        seconds = {name: parallel.gather_stack(world, tel.seconds[name]) for name in TIMINGS}
        pure = parallel.gather_stack(world, pure_comm)
        traffic = parallel.gather_stack(world, tel.traffic)             # [P, L_moe, ep]
        tokens_per_expert = parallel.sum_to_all(world, tel.tokens_per_expert)
        rows = parallel.gather_stack(world, tel.rows_computed)          # [P, L_moe]
        rerouted = parallel.sum_to_all(world, tel.rerouted)
        dropped = parallel.sum_to_all(world, tel.dropped)
        peak = world.gather(peak_host_bytes(), root=0)
        if not writer:
            return None
        writer.attrs(**attrs)
        P = world.size
        writer.array("axes/layer", np.arange(meta.num_layers), scale="layer",
                     description=f"layer index; layers 0..{meta.num_dense_layers - 1} are dense")
        writer.array("axes/rank", np.arange(P), scale="rank", description="MPI world rank")
        writer.array("axes/expert", np.arange(meta.num_experts), scale="expert",
                     description="expert index within a MoE layer")
        for name, data in seconds.items():
            writer.array(f"timings/{name}", data, units="s", dims="rank, layer",
                         description=TIMING_MEANING[name])
        busy, wait, compute = seconds["busy"], seconds["wait"], seconds["compute"]
        overall = busy + wait
        writer.array("timings/overall", overall, units="s", dims="rank, layer",
                     description=TIMING_MEANING["overall"])
        writer.array("timings/pure_comm", pure, units="s", dims="rank, layer",
                     description=TIMING_MEANING["pure_comm"])
        writer.array("timings/overlap", overlap_percent(overall, compute, pure), units="%",
                     dims="rank, layer",
                     definition="max(0, 100 * (1 - (overall - compute) / pure_comm))")
        moe = np.array(list(meta.moe_layers), dtype=np.int32)
        writer.array("stats/moe_layers", moe, scale="moe layer",
                     description="the layer index of each MoE layer (the moe layer axis)")
        writer.array("stats/tokens_per_expert", tokens_per_expert, dims="moe layer, expert",
                     units="(token, expert) pairs", description="pairs routed to each expert")
        writer.array("stats/tokens_per_rank", rows.T.copy(), dims="moe layer, rank",
                     units="rows", description="rows each rank's experts computed")
        # traffic: rows each rank sent to each rank of its expert group, as world ranks
        ep = traffic.shape[2]
        full = np.zeros((len(moe), P, P), dtype=np.int64)
        for src in range(P):
            base = (src // ep) * ep
            full[:, src, base:base + ep] = traffic[src]
        writer.array("stats/traffic", full, dims="moe layer, source rank, destination rank",
                     units="rows", description="rows each rank sent to each rank (with node "
                                               "dispatch: both stages)")
        prediction = None
        if forecast is not None:          # from replica 0's block: the replicas are alike
            G = forecast.job.ranks
            prediction = forecast.predict(full[:, :G, :G], rows.T[:, :G])
            write_prediction(writer, prediction)
        if gpus_per_node and P % gpus_per_node == 0:
            nodes = P // gpus_per_node
            pairs = full.reshape(len(moe), nodes, gpus_per_node, nodes, gpus_per_node)
            writer.array("axes/node", np.arange(nodes), scale="node",
                         description=f"node: world ranks node*{gpus_per_node} .. "
                                     f"node*{gpus_per_node} + {gpus_per_node - 1}")
            writer.array("stats/node_traffic", pairs.sum(axis=(2, 4)),
                         dims="moe layer, source node, destination node", units="rows",
                         description="rows sent between nodes (off the diagonal: across the "
                                     "inter-node links), summed over their ranks")
        loads = np.stack(history["tokens_per_expert"])                 # [B, L_moe, E]
        writer.array("axes/batch", np.arange(len(loads)), scale="batch",
                     description="batch index (pipeline.batch_tokens per rank each)")
        writer.array("balance/bias", np.stack(history["bias"]),
                     dims="batch, moe layer, expert", note="bias used for each batch")
        writer.array("balance/tokens_per_expert", loads, dims="batch, moe layer, expert")
        writer.array("balance/max_violation", max_violation(loads), dims="batch, moe layer",
                     definition="max(load) / mean(load) - 1")
        writer.array("stats/rerouted", rerouted, dims="moe layer")
        writer.array("stats/dropped", dropped, dims="moe layer")
        writer.array("stats/peak_host_bytes", np.array(peak, dtype=np.int64), dims="rank",
                     units="bytes", description="each rank's peak resident host memory, "
                                                "up to the end of the forward pass")
        writer.commit()
        self.writer = None
        return prediction

    def discard(self) -> None:
        """Remove the partial file (rank 0; a no-op once committed)."""
        if self.writer:
            writer, self.writer = self.writer, None
            writer.discard()
