"""Requeue-safe progress: one file per completed batch, written atomically; a restart resumes after the last.

The checkpoint is a folder.  After batch ``b`` every rank's rows of that batch (the
residual stream before the final norm, and its routing when saved) are gathered to rank 0,
which writes ``batch-{b:05d}.h5`` under a temporary name and renames it, so a file that
exists is complete.  Each file also holds the cumulative counters of every rank and the
balancer's state, so the newest file alone restores them.  A job killed at any moment
restarts from the newest complete batch: no token is lost or computed twice, and the same
micro-batch count (recorded, and reused where the start-up timing would choose another), biases and
placement make the result identical to an uninterrupted run.  A resumption whose settings
differ is refused, naming them.
"""

from __future__ import annotations

import glob
import json
import os

import h5py
import numpy as np

from moempi.errors import MoempiError
from moempi.io import files
from moempi.runtime import parallel

STATE = ("tokens_per_expert", "traffic", "rows_computed", "rerouted", "dropped")


def fingerprint(cfg, world_size: int, num_tokens: int, batch_tokens: int,
                placement=None) -> str:
    """What must not change between a run and its resumption, as canonical JSON of
    ``{setting: value}``: every config key but the output's, the job's shape, the placement
    and the input files' identity (size and modification time)."""
    data = {f"{section}.{key}": value for section, table in cfg.to_dict().items()
            for key, value in table.items()}
    for key in ("run.output", "run.overwrite", "run.checkpoint", "pipeline.measure_pure_comm",
                "pipeline.pure_comm_layers", "pipeline.tuning_budget",
                "pipeline.local_kernels",
                "pipeline.stall_timeout", "pipeline.chunk_rows", "run.weights",
                "run.calibration"):
        data.pop(key)
    for key in ("run.model", "run.tokens"):
        st = os.stat(data[key])
        data[f"{key} file"] = f"{st.st_size} bytes, modified {st.st_mtime_ns}"
    data.update(world_size=world_size, num_tokens=num_tokens, batch_tokens=batch_tokens)
    if placement is not None:
        data["placement"] = placement.to_dict()
    return json.dumps(data, sort_keys=True)


def _differences(found: dict, expected: dict, micro_batches: int) -> list[str]:
    """The settings a resumption changes, as ``key: was X, now Y``."""
    changed = []
    for key in sorted(set(found) | set(expected)):
        was, now = found.get(key), expected.get(key)
        if key == "pipeline.micro_batches":
            if now in (0, micro_batches):
                continue         # 0: the recorded count is reused; or the same count named
            was = micro_batches if was == 0 else was
            if was == micro_batches and found.get(key) == 0:
                was = f"{micro_batches} (the timed choice)"
        if was != now:
            if key == "placement":
                was, now = "one placement", "another"
            changed.append(f"{key}: was {was}, now {now}")
    return changed


def _batch_file(path: str, batch: int) -> str:
    return os.path.join(path, f"batch-{batch:05d}.h5")


def _count_done(path: str) -> int:
    """The completed batches in ``path``: files ``0, 1, ...`` up to the first missing one."""
    done = 0
    while os.path.exists(_batch_file(path, done)):
        done += 1
    return done


def scan(path: str, expected: str) -> dict:
    """Rank 0: the completed batches in ``path`` (contiguous from 0) and their run's settings."""
    done = _count_done(path)
    if done == 0:
        return {"done": 0, "micro_batches": 0}
    last = _batch_file(path, done - 1)
    try:
        with h5py.File(last, "r") as f:
            found, micro = f.attrs["fingerprint"], int(f.attrs["micro_batches"])
    except (OSError, KeyError) as exc:
        raise MoempiError(f"{last}: unreadable checkpoint ({exc}); remove {path} to start over") from None
    try:
        changed = _differences(json.loads(found), json.loads(expected), micro)
    except (TypeError, ValueError):
        changed = ["the checkpoint's settings are unreadable"]
    if changed:
        raise MoempiError(f"{path}: checkpoint belongs to another run ({'; '.join(changed[:3])}"
                          f"{'; ...' if len(changed) > 3 else ''}); resume with the same "
                          "settings, or remove it or choose another --checkpoint")
    return {"done": done, "micro_batches": micro}


def check_checkpoint_path(path: str, inputs: dict[str, str]) -> None:
    """Rank 0, before any work: ``path`` must be a folder (or not exist yet) holding no input
    (its batch files are removed when the output is complete)."""
    files.check_not_input(path, inputs, "checkpoint")
    if os.path.exists(path) and not os.path.isdir(path):
        raise MoempiError(f"{path}: checkpoint path is a file, not a folder")
    for name in glob.glob(os.path.join(glob.escape(path), "batch-*.h5")):
        files.check_not_input(name, inputs, "checkpoint")


def checkpoint_complete(path: str) -> bool:
    """Whether ``path`` holds every batch of its run (the run finished; only clean-up was left)."""
    done = _count_done(path)
    if not done:
        return False
    try:
        with h5py.File(_batch_file(path, done - 1), "r") as f:
            return done == int(f.attrs["num_batches"])
    except (OSError, KeyError):
        return False


class Checkpoint:
    """Writes and restores batch files; every method is called on every rank."""

    def __init__(self, world, path: str, expected: str, num_batches: int):
        self.world, self.path, self.expected = world, path, expected
        self.num_batches = num_batches
        if world.rank == 0:
            os.makedirs(path, exist_ok=True)

    def save(self, batch: int, micro_batches: int, rows: np.ndarray, lo: int,
             routing: dict | None, tel, history: dict, bias_next: np.ndarray) -> None:
        """Batch ``batch`` is done: this rank's rows ``rows`` start at shard row ``lo``;
        ``routing`` (MoE layer -> (topk_idx, dest_rank)) holds the same rows, or is None."""
        world = self.world
        placed = world.gather((len(rows), lo), root=0)      # this batch's rows, first shard row
        state = {name: parallel.gather_stack(world, getattr(tel, name)) for name in STATE}
        f = tmp = ds = offsets = None
        if world.rank == 0:
            final = _batch_file(self.path, batch)
            tmp = files.register(final)
            f = h5py.File(tmp, "w")
            f.attrs.update(fingerprint=self.expected, batch=batch, micro_batches=micro_batches,
                           num_batches=self.num_batches)
            counts, los = zip(*placed)
            f["rank_rows"] = np.array(counts)               # rows of each rank in this batch
            f["rank_lo"] = np.array(los)                    # their first row within the shard
            offsets = np.concatenate([[0], np.cumsum(counts)])
            ds = f.create_dataset("hidden", (int(offsets[-1]), rows.shape[1]), "f4")
        try:
            parallel.stream_rows_to_dataset(world, rows, ds, offsets)
            if routing is not None:
                for m, arrays in routing.items():
                    for name, arr in zip(("topk_idx", "dest_rank"), arrays):
                        rds = f.create_dataset(f"routing/{m}/{name}", (int(offsets[-1]), arr.shape[1]),
                                               "i4") if f else None
                        parallel.stream_rows_to_dataset(world, arr, rds, offsets)
            if f:
                for name, data in state.items():
                    f[f"state/{name}"] = data
                f["state/bias_next"] = bias_next
                f["history/bias"] = np.stack(history["bias"])
                f["history/tokens_per_expert"] = np.stack(history["tokens_per_expert"])
                f.close()
                os.replace(tmp, final)      # a batch file is rewritten only by its own run
        except BaseException:
            if f:
                f.close()
            raise
        finally:
            if tmp:
                files.release(tmp)
        world.Barrier()

    def restore(self, done: int, output, with_routing: bool, tel, history: dict,
                bias: np.ndarray) -> None:
        """Restore the counters and the balancer from batch ``done - 1`` and copy the rows of
        batches ``0..done-1`` into ``output`` (:class:`moempi.runtime.output.OutputFile`),
        one rank's batch at a time, on rank 0."""
        world = self.world
        last = None
        if world.rank == 0:
            with h5py.File(_batch_file(self.path, done - 1), "r") as f:
                last = {name: f[f"state/{name}"][()] for name in STATE}
                last["bias_next"] = f["state/bias_next"][()]
                last["history_bias"] = f["history/bias"][()]
                last["history_load"] = f["history/tokens_per_expert"][()]
        last = world.bcast(last, root=0)
        for name in STATE:
            getattr(tel, name)[...] = last[name][world.rank]
        bias[...] = last["bias_next"]
        history["bias"][:] = list(last["history_bias"])
        history["tokens_per_expert"][:] = list(last["history_load"])
        if world.rank == 0:
            for b in range(done):
                with h5py.File(_batch_file(self.path, b), "r") as f:
                    counts = f["rank_rows"][()]
                    offsets = np.concatenate([[0], np.cumsum(counts)])
                    for rank, (a, z) in enumerate(zip(offsets[:-1], offsets[1:])):
                        routing = None
                        if with_routing:
                            routing = {int(m): (g["topk_idx"][a:z], g["dest_rank"][a:z])
                                       for m, g in f["routing"].items()}
                        output.restored(rank, int(f["rank_lo"][rank]), f["hidden"][a:z],
                                        routing)
        world.Barrier()

    def remove(self) -> None:
        """The output is complete: the checkpoint is no longer needed."""
        if self.world.rank == 0:
            for name in glob.glob(os.path.join(self.path, "batch-*.h5*")):
                os.unlink(name)
            if os.path.isdir(self.path) and not os.listdir(self.path):
                os.rmdir(self.path)

