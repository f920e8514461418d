"""Run configuration: frozen dataclasses, TOML plus command-line overrides, validation; no MPI."""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from moempi.errors import MoempiError
from moempi.io.readers import read_toml


@dataclass(frozen=True)
class RunSection:
    model: str = ""                  # model checkpoint (HDF5, docs/design.md §2.1); required
    tokens: str = ""                 # tokens file (HDF5, /tokens [N, H]); required
    output: str = "moempi-{job}.h5"  # output file; {job}: the Slurm job (and array task) id
    checkpoint: str = ""             # folder for per-batch checkpoints; a restart resumes from it
    placement: str = ""              # placement JSON; empty = the default rule (docs/design.md §2.4)
    precision: str = "fp32"          # "fp32": float32 compute and wire; "bf16": BF16 wire, fp32 accumulation
    save_routing: bool = False       # write /routing (docs/design.md §2.3) for `moempi place`
    gpu_memory_gb: float = 0.0       # memory per GPU for the start-up check; 0 = the device's
                                     # own (GPU backends), no check on the numpy backend
    host_memory_gb: float = 0.0      # host memory per rank for the start-up check; 0 = the
                                     # node's available memory shared by its ranks
    overwrite: bool = False          # replace an existing output file
    weights: str = "each"            # "each": every rank reads its own slabs (the file on every
                                     # node); "rank0": rank 0 reads the model and sends each slab
    calibration: str = ""            # calibration JSON (`moempi bench calibrate`) whose figures
                                     # predict the run beside its measurement; "" = the run's
                                     # own start-up probes (GEMMs and wire only)


@dataclass(frozen=True)
class ParallelSection:
    ep: int = 0                      # expert-parallel group size; 0 = world size / (tp * dp)
    tp: int = 1                      # tensor-parallel ranks inside one expert
    dp: int = 1                      # data-parallel replicas of the whole expert group
    allow_packing: bool = False      # allow a placement to give one rank two experts of a layer


@dataclass(frozen=True)
class PipelineSection:
    overlap: bool = True             # nonblocking exchange overlapped with expert compute
    dispatch: str = "direct"         # "direct": tokens straight to their experts' ranks; "node":
                                     # once to each destination node, forwarded inside it
    micro_batches: int = 0           # micro-batches per batch in flight; 0 = chosen by timing
                                     # the first batch's own layers
    max_micro_batches: int = 16      # upper bound for the automatic choice
    tuning_budget: float = 0.02      # the automatic choice may cost this share of the job's
                                     # forecast MoE work
    chunk_rows: int = 0              # expert GEMM rows between MPI polls while exchanges are in
                                     # flight (CPU); 0 = measured at start-up
    batch_tokens: int = 0            # tokens per rank per batch (balancing/checkpoint step); 0 = all
    local_kernels: str = "auto"      # the exchange's local steps on the CPU: "compiled" (numba,
                                     # one pass each), "numpy", or "auto": compiled when the
                                     # job's exchanged rows repay loading them; same bits
    measure_pure_comm: bool = True   # replay exchanges without compute (for overlap %)
    pure_comm_layers: str = "sample" # "sample": layers within 2 % of the forward, the others
                                     # estimated from their rows; "all": every MoE layer
    stall_timeout: float = 300.0     # seconds without progress before a rank says what it waits
                                     # for and the job ends; 0 = wait for ever


@dataclass(frozen=True)
class BalanceSection:
    enabled: bool = False            # auxiliary-loss-free bias balancing (DeepSeek-V3)
    rate: float = 0.001              # bias step per batch: b += rate * sign(mean_load - load)
    clip: float = 0.0                # |bias| limit; 0 = no clipping
    capacity_factor: float = 0.0     # per-replica capacity = factor * mean load; 0 = dropless
    overflow: str = "reroute"        # "reroute" to the next-best expert with room, or "drop"


@dataclass(frozen=True)
class BackendSection:
    name: str = "numpy"              # "numpy" (CPU), "cupy" (GPU), "standin" (CuPy code on numpy, for CI)
    cuda_aware: str = "auto"         # "auto" (ask the MPI library), "yes" or "no"
    unverified_gpu: bool = False     # run "cupy" although it failed its checks on a real GPU


@dataclass(frozen=True)
class Config:
    run: RunSection = field(default_factory=RunSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    balance: BalanceSection = field(default_factory=BalanceSection)
    backend: BackendSection = field(default_factory=BackendSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        """Checks that need no MPI and no files; the same on every rank."""
        r, p, pl, b = self.run, self.parallel, self.pipeline, self.balance
        if not r.model:
            raise MoempiError("config: run.model is required (a model file; --model)")
        if not r.tokens:
            raise MoempiError("config: run.tokens is required (a tokens file; --tokens)")
        if r.gpu_memory_gb < 0 or r.host_memory_gb < 0:
            raise MoempiError("config: run.gpu_memory_gb and host_memory_gb must be >= 0")
        if r.precision not in ("fp32", "bf16"):
            raise MoempiError(f"config: run.precision must be fp32 or bf16, not {r.precision!r}")
        if pl.dispatch not in ("direct", "node"):
            raise MoempiError(f"config: pipeline.dispatch must be direct or node, not "
                              f"{pl.dispatch!r}")
        if r.weights not in ("each", "rank0"):
            raise MoempiError(f"config: run.weights must be each or rank0, not {r.weights!r}")
        if p.ep < 0 or p.tp < 1 or p.dp < 1:
            raise MoempiError("config: parallel.ep must be >= 0, tp and dp >= 1")
        if pl.stall_timeout < 0:
            raise MoempiError("config: pipeline.stall_timeout must be >= 0 (0: no timeout)")
        if pl.pure_comm_layers not in ("sample", "all"):
            raise MoempiError(f"config: pipeline.pure_comm_layers must be sample or all, not "
                              f"{pl.pure_comm_layers!r}")
        if pl.local_kernels not in ("auto", "compiled", "numpy"):
            raise MoempiError(f"config: pipeline.local_kernels must be auto, compiled or numpy, "
                              f"not {pl.local_kernels!r}")
        if not 0 <= pl.tuning_budget <= 1:
            raise MoempiError(f"config: pipeline.tuning_budget must be in [0, 1], not "
                              f"{pl.tuning_budget}")
        if pl.micro_batches < 0 or pl.max_micro_batches < 1 or pl.batch_tokens < 0 or \
                pl.chunk_rows < 0:
            raise MoempiError("config: pipeline.micro_batches, batch_tokens and chunk_rows must "
                              "be >= 0, max_micro_batches >= 1")
        if b.rate < 0 or b.clip < 0 or b.capacity_factor < 0:
            raise MoempiError("config: balance.rate, clip and capacity_factor must be >= 0")
        if b.overflow not in ("reroute", "drop"):
            raise MoempiError(f"config: balance.overflow must be reroute or drop, not {b.overflow!r}")
        if self.backend.name not in ("numpy", "cupy", "standin"):
            raise MoempiError(f"config: backend.name must be numpy, cupy or standin, "
                              f"not {self.backend.name!r}")
        if self.backend.cuda_aware not in ("auto", "yes", "no"):
            raise MoempiError("config: backend.cuda_aware must be auto, yes or no")
        if self.backend.name == "cupy" and not self.backend.unverified_gpu:
            # correct on the stand-in, but not yet verified on a GPU since the ordering fix
            # (README, "GPU"): a run must not hand users unverified results unasked
            raise MoempiError("config: backend cupy has not yet passed `make gpu-check` on a "
                              "GPU (README, 'GPU'): use backend.name=numpy, or set "
                              "backend.unverified_gpu=true to run it anyway")
        return self


_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def job_id(env=None) -> str:
    """The Slurm job id (``JOB_TASK`` for an array task), or ``local`` outside Slurm."""
    import os
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or "local"


def expand_names(cfg: Config, env=None) -> Config:
    """Replace ``{job}`` in the output and checkpoint paths with :func:`job_id`."""
    job = job_id(env)
    run = dataclasses.replace(cfg.run, output=cfg.run.output.replace("{job}", job),
                              checkpoint=cfg.run.checkpoint.replace("{job}", job))
    return dataclasses.replace(cfg, run=run)


def _coerce(value, kind, where: str):
    """Check a TOML value against a field's type (int, float, bool or str)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise MoempiError(f"{where} must be {kind.__name__}, got {value!r}")


def parse_value(text: str):
    """A ``--set`` value in TOML syntax; a bare word is taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def build_config(data: dict, overrides: dict[str, object] | None = None,
                 source: str = "config") -> Config:
    """Config from nested TOML data plus ``{"section.key": value}`` overrides, type-checked."""
    merged: dict[str, dict] = {}
    for name, table in data.items():
        if name not in _SECTIONS:
            raise MoempiError(f"{source}: unknown section [{name}] "
                              f"(known: {', '.join(_SECTIONS)})")
        if not isinstance(table, dict):
            raise MoempiError(f"{source}: [{name}] must be a table")
        merged[name] = dict(table)
    for dotted, value in (overrides or {}).items():
        name, _, key = dotted.partition(".")
        if name not in _SECTIONS or not key:
            raise MoempiError(f"--set {dotted}: expected section.key with section one of "
                              f"{', '.join(_SECTIONS)}")
        merged.setdefault(name, {})[key] = value
    sections = {}
    for name, factory in _SECTIONS.items():
        cls = factory().__class__
        hints = typing.get_type_hints(cls)
        table = merged.get(name, {})
        unknown = sorted(set(table) - set(hints))
        if unknown:
            raise MoempiError(f"{source}: unknown key {name}.{unknown[0]} "
                              f"(known in [{name}]: {', '.join(hints)})")
        sections[name] = cls(**{k: _coerce(v, hints[k], f"{source}: {name}.{k}")
                                for k, v in table.items()})
    return Config(**sections)


def load_config(path: str | None, overrides: dict[str, object] | None = None) -> Config:
    """Read a TOML run configuration (optional) and apply overrides; not yet validated."""
    data = read_toml(path, "config") if path else {}
    return build_config(data, overrides, source=path or "config")
