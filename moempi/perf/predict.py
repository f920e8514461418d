"""What the time model predicts for a job that ran: ``moempi plan``'s terms at the run's own
configuration and its measured routing (rows each rank sent to each rank, rows each rank
computed), so that the prediction and the measurement can sit side by side in the output
file and in ``moempi inspect``, and ``make validate`` can hold the model to them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moempi.model.shapes import ModelMeta
from moempi.perf.analytic import (Forecast, Hardware, Layout, forward_time, serial_time,
                                   traffic_from_rows)


# what a run's prediction records as its source without a calibration (runtime.prediction),
# and what `inspect` recognises
STARTUP_SOURCE = "start-up probes (GEMMs and wire only)"


@dataclass(frozen=True)
class JobRun:
    """A run's configuration as the model needs it (one replica: ``ranks = ep * tp``)."""

    ranks: int                 # ranks of one replica (ep * tp)
    tokens_per_rank: int       # tokens of the busiest rank over the whole job
    micro_batches: int         # the count the run used (after tuning)
    precision: str = "fp32"    # "fp32" | "bf16": the wire
    overlap: bool = True
    tp: int = 1
    batch_tokens: int = 0      # tokens per rank per batch; 0 = all in one batch
    dispatch: str = "direct"   # "direct" | "node"
    gpus_per_node: int = 0     # node size (node dispatch, inter-node links); 0 = all ranks

    @property
    def batch(self) -> int:
        per = self.tokens_per_rank
        return min(self.batch_tokens or per, per) if per else 1

    @property
    def batches(self) -> int:
        return max(1, -(-self.tokens_per_rank // self.batch))


def job_traffic(meta: ModelMeta, hw: Hardware, job: JobRun, traffic: np.ndarray,
                computed: np.ndarray | None = None) -> dict:
    """Each MoE layer's :class:`Traffic` in one batch of ``job``: ``traffic`` `[L_moe, P,
    P]` rows each rank sent to each rank over the whole job (the output's
    ``/stats/traffic``; with node dispatch both stages), ``computed`` `[L_moe, P]` rows each
    rank's experts computed (``/stats/tokens_per_rank``), both divided by the batches."""
    b = job.batches
    return {l: traffic_from_rows(np.asarray(traffic[i], float) / b,
                                 None if computed is None else np.asarray(computed[i], float) / b,
                                 job.tp, hw.gpus_per_node, hw.link)
            for i, l in enumerate(meta.moe_layers)}


def forecast_job(meta: ModelMeta, hw: Hardware, job: JobRun, traffic: np.ndarray | None = None,
                 computed: np.ndarray | None = None, per_layer: dict | None = None) -> Forecast:
    """The model's forecast of one batch of ``job``, with the routing of
    :func:`job_traffic` (or its result ``per_layer``); without either, uniform routing."""
    layout = Layout(ep=job.ranks // job.tp, tp=job.tp, dp=1, tokens_per_gpu=job.batch,
                    micro_batches=job.micro_batches, precision=job.precision,
                    dispatch=job.dispatch)
    if per_layer is None and traffic is not None:
        per_layer = job_traffic(meta, hw, job, traffic, computed)
    return forward_time(meta, hw, layout, per_layer, max_micro_batches=job.micro_batches)


def predicted_seconds(fc: Forecast, job: JobRun) -> np.ndarray:
    """Predicted seconds of each layer over the whole job `[L]`: the batch's layer time
    (overlapped, or the micro-batches one after the other without overlap) x batches."""
    per = [lt.overlapped_s if job.overlap else serial_time(lt) for lt in fc.layers]
    return np.array(per) * job.batches


__all__ = ["STARTUP_SOURCE", "JobRun", "forecast_job", "job_traffic", "predicted_seconds"]
