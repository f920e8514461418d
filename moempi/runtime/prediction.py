"""The time model's prediction of the run, recorded beside its measurement (docs/design.md §2.3).

The figures come from a calibration file (``run.calibration``, written by ``moempi bench
calibrate``) or, without one, from the run's own probes: one Alltoallv probe at start-up
(every rank) and the expert MLP's rate (what the GEMM chunk measurement timed, else, only
then, one timing of a real expert on rank 0 when it predicts, after the forward pass).  The probes have no CPU terms (the norm, gate, packing and scheduler beside the
GEMMs: :class:`moempi.perf.analytic.Hardware`), so that prediction is the GEMMs and the wire
only, and says so.  Rank 0 predicts after the forward pass from the measured routing
(:func:`moempi.perf.predict.forecast_job`); a prediction that fails is recorded as such,
never at the cost of the run's output.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from moempi import errors
from moempi.errors import MoempiError
from moempi.io.topology import Topology
from moempi.model.shapes import ModelMeta
from moempi.perf.analytic import Calibration, Hardware
from moempi.perf.predict import STARTUP_SOURCE, JobRun, forecast_job, predicted_seconds
from moempi.runtime.dispatch import probe_network

PROBE_BYTES = 1 << 20         # the probe's large exchange sends at most this much to each peer
GEMM_ROWS = (16, 256)         # the expert timing's rows: a rank's rows per expert, clamped
                              # (at H 7168, F 2048 on one CPU core 256 rows take ~0.4 s)


def load_calibration(path: str) -> Calibration | None:
    """Rank 0, before any work: the ``run.calibration`` file read and checked; None when not
    given.  Any problem with it is one line naming the key and the file."""
    if not path:
        return None
    try:
        return Calibration.load(path)
    except MoempiError as exc:
        raise MoempiError(f"run.calibration: {exc}") from None
    except OSError as exc:
        raise MoempiError(f"run.calibration: {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class Probes:
    """The run's own figures when no calibration is given: the network's, measured at
    start-up by every rank, and how to get the expert GEMM rate (rank 0, only if the GEMM
    chunk measurement gave none)."""

    latency_s: float           # one (almost) empty Alltoallv
    bandwidth_Bps: float       # per rank, of an Alltoallv of the job's message size
    seconds: float             # what measuring the network took
    gemm_flops: object         # () -> the job's expert MLP rate on rank 0's backend


def probe(comm, weights, backend, tokens_per_rank: int, wire_bytes: int) -> Probes:
    """Every rank of ``comm`` (one replica): the Alltoallv latency and bandwidth at the
    job's rows per peer (at most :data:`PROBE_BYTES`), tens of ms; the expert MLP's rate
    is timed later, and only when needed (:meth:`RunForecast.hardware`)."""
    t = time.perf_counter()
    meta = weights.meta
    per_peer = tokens_per_rank * meta.top_k // max(comm.size, 1)
    rows = int(np.clip(per_peer, 8, max(8, PROBE_BYTES // (meta.hidden_size * wire_bytes))))
    latency, bandwidth = probe_network(comm, meta.hidden_size, wire_bytes, rows=rows, repeats=3)
    per_expert = tokens_per_rank * meta.top_k * comm.size // max(meta.num_experts, 1)
    gemm_rows = int(np.clip(per_expert, *GEMM_ROWS))
    return Probes(latency, bandwidth, time.perf_counter() - t,
                  lambda: expert_rate(weights, backend, gemm_rows))


def expert_rate(weights, backend, rows: int, repeats: int = 2) -> float:
    """FLOP/s of this rank's first expert MLP (of the first MoE layer) on ``rows`` random rows,
    best of ``repeats`` after one warm-up, on the backend the forward pass uses; 0 without one."""
    layer = next((l for l in weights.layers if getattr(l, "experts", None)), None)
    if layer is None:
        return 0.0
    w = next(iter(layer.experts.values()))       # (w_in [H, F], w_out [F, H][, w_gate])
    hidden, ffn = w[0].shape
    rng = np.random.default_rng(0)
    h = backend.to_device(rng.standard_normal((rows, hidden), dtype=np.float32))
    best = float("inf")
    with backend.running():
        for _ in range(repeats + 1):
            backend.synchronize()
            t = time.perf_counter()
            backend.mlp(h, w[0], w[1], weights.meta.activation,
                        w_gate=w[2] if len(w) == 3 else None)
            backend.synchronize()
            best = min(best, time.perf_counter() - t)
    return 2.0 * len(w) * hidden * ffn * rows / max(best, 1e-12)


@dataclass(frozen=True)
class Prediction:
    """What rank 0 records: per-layer seconds `[L]` (None when the model could not predict)
    and the root attributes (``prediction_source`` ... or ``prediction_error``)."""

    seconds: np.ndarray | None
    attrs: dict

    def line(self, measured_s: float) -> str:
        """One line for the job's log: the prediction against the measured forward."""
        if self.seconds is None:
            return f"warning: no prediction recorded: {self.attrs['prediction_error']}"
        pred = float(self.seconds.sum())
        return (f"model's prediction: forward {pred:.3f} s against {measured_s:.3f} s measured "
                f"({pred / max(measured_s, 1e-12) - 1:+.0%}), from "
                f"{self.attrs['prediction_source']}")


@dataclass(frozen=True)
class RunForecast:
    """Everything rank 0 needs to predict the finished run, but its routing."""

    meta: ModelMeta
    job: JobRun
    calibration: Calibration | None
    calibration_path: str
    probes: Probes | None
    gemm_rates: dict           # the GEMM chunk measurement's FLOP/s by rows (CPU); may be {}

    def hardware(self) -> tuple[Hardware, str]:
        """The figures and where they come from (the ``prediction_source`` attribute)."""
        per_node = self.job.gpus_per_node or self.job.ranks
        if self.calibration is not None:
            topo = Topology(nodes=max(1, -(-self.job.ranks // per_node)), gpus_per_node=per_node)
            return (self.calibration.hardware(self.job.ranks, topo),
                    f"calibration {self.calibration_path} ({self.calibration.machine})")
        p = self.probes
        flops = self.gemm_rates[max(self.gemm_rates)] if self.gemm_rates else p.gemm_flops()
        return (Hardware(gemm_flops=flops, latency_s=p.latency_s, intra_Bps=p.bandwidth_Bps,
                         inter_Bps=p.bandwidth_Bps, link="measured", gpus_per_node=per_node,
                         memory_bytes=0.0, source="start-up probes"), STARTUP_SOURCE)

    def predict(self, traffic: np.ndarray, computed: np.ndarray) -> Prediction:
        """Rank 0, after the forward: ``traffic`` `[L_moe, G, G]` rows one replica's ranks sent
        each other, ``computed`` `[L_moe, G]` rows each one's experts computed.  Never raises:
        the run's output matters more than its forecast, so a failure is recorded (and
        printed; ``moempi --debug`` re-raises it)."""
        try:
            hw, source = self.hardware()
            seconds = predicted_seconds(forecast_job(self.meta, hw, self.job, traffic, computed),
                                        self.job)
            if seconds.shape != (self.meta.num_layers,) or not np.isfinite(seconds).all():
                raise MoempiError(f"the model gave {seconds.shape[0]} layer times, not "
                                  f"{self.meta.num_layers} finite ones")
        except Exception as exc:        # any failure: recorded in the output and printed
            if errors.DEBUG:
                raise
            return Prediction(None, {"prediction_error": errors.describe(exc)})
        return Prediction(seconds, {
            "prediction_source": source, "predicted_forward_seconds": float(seconds.sum()),
            "prediction_hardware": dataclasses.asdict(hw),
            "prediction_job": dataclasses.asdict(self.job),
            **({"prediction_calibration_ranks": [n for n, _, _ in self.calibration.alltoall]}
               if self.calibration is not None else {})})


__all__ = ["Prediction", "Probes", "RunForecast", "expert_rate",
           "load_calibration", "probe"]
