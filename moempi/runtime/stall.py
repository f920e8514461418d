"""Stalls end with a diagnosis: a rank without progress for ``pipeline.stall_timeout`` seconds says what it waits for, and the job ends.

A watcher thread on every rank notes the time of the last layer any micro-batch finished.
When that is older than the timeout, it asks every other rank's watcher where that rank
is, on a communicator of its own, and waits a few seconds for the answers: a rank that
does not answer is stopped or gone; one that answers says its layer, micro-batch and step.
The lowest rank that hears no lower rank answer says it in one line and aborts the job
(a stopped process cannot be ended any other way).  Exchanges are collectives, so which
rank's data is missing is not visible to MPI's caller: the silent ranks are the answer.
"""

from __future__ import annotations

import sys
import threading
import time

from mpi4py import MPI

from moempi.io import files
from moempi.runtime.pipeline import Scheduler

WHERE, HERE = 7201, 7202       # message tags: a question and its answer
ANSWER_WAIT = 3.0              # seconds to wait for the other ranks' answers
POLL = 0.5                     # seconds between the watcher's looks (few: it takes MPI's lock)


class WatchedScheduler(Scheduler):
    """The pipeline's scheduler, keeping the batch's micro-batches where the watcher sees them."""

    tasks: list = []

    def run(self, tasks: list) -> None:
        self.tasks = tasks
        super().run(tasks)


def _step(task) -> str:
    """Which exchange a waiting micro-batch is in: the ``name`` of the pipeline's
    ``MicroBatch._exchange`` generator it delegates to (read only, for the diagnosis)."""
    inner = getattr(task.steps, "gi_yieldfrom", None)
    frame = getattr(inner, "gi_frame", None)
    return (frame.f_locals.get("name") if frame is not None else None) or "exchange"


class Watchdog:
    """Created on every rank of ``comm`` together (it duplicates ``comm``); :meth:`close` too."""

    def __init__(self, comm: MPI.Comm, scheduler: WatchedScheduler, timeout: float):
        self.scheduler, self.timeout = scheduler, timeout
        self.comm = comm.Dup()
        self.batch = 0
        self.last = time.monotonic()
        self.reported = False
        self.sent = []                 # send requests, kept (with their buffers) until the end
        self.done = threading.Event()
        self.thread = None
        if timeout > 0 and MPI.Query_thread() == MPI.THREAD_MULTIPLE:
            self.thread = threading.Thread(target=self._watch, name="moempi-stall", daemon=True)
            self.thread.start()

    def progress(self, on_layer_done=None):
        """``ctx.on_layer_done`` that also notes the progress (then calls ``on_layer_done``)."""
        def done(micro_batch: int, layer: int) -> None:
            self.last = time.monotonic()
            if on_layer_done is not None:
                on_layer_done(micro_batch, layer)
        return done

    def new_batch(self, batch: int) -> None:
        self.batch, self.last = batch, time.monotonic()

    def close(self) -> None:
        if self.thread is not None:
            self.done.set()
            self.thread.join()
            self.thread = None
            self.comm.Barrier()       # no question of one rank's watcher left unanswered
        if self.comm != MPI.COMM_NULL:
            self.comm.Free()

    # -- the watcher thread ----------------------------------------------------------------
    def where(self) -> str:
        """This rank's position, for a diagnosis: the pending micro-batches' layer and step."""
        tasks, pending = self.scheduler.tasks, dict(self.scheduler.pending)
        idle = time.monotonic() - self.last
        if not pending:
            return (f"is between exchanges in batch {self.batch + 1} ({idle:.0f} s since its last "
                    "layer: a balance allreduce or a checkpoint?)")
        parts = [f"layer {tasks[i].layer}, micro-batch {i}, {_step(tasks[i])}"
                 for i in sorted(pending) if i < len(tasks)]
        return f"waits in batch {self.batch + 1}: " + "; ".join(parts)

    def _answer(self) -> None:
        status = MPI.Status()
        while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=WHERE, status=status):
            asker = status.Get_source()
            self.comm.recv(source=asker, tag=WHERE)
            self.sent.append(self.comm.isend(self.where(), dest=asker, tag=HERE))

    def _watch(self) -> None:
        while not self.done.wait(POLL):
            self._answer()
            if not self.reported and time.monotonic() - self.last > self.timeout:
                self._diagnose()

    def _diagnose(self) -> None:
        comm, me = self.comm, self.comm.rank
        others = [r for r in range(comm.size) if r != me]
        self.sent += [comm.isend(me, dest=r, tag=WHERE) for r in others]
        answers, status = {}, MPI.Status()
        deadline = time.monotonic() + ANSWER_WAIT
        while len(answers) < len(others) and time.monotonic() < deadline:
            if comm.iprobe(source=MPI.ANY_SOURCE, tag=HERE, status=status):
                answers[status.Get_source()] = comm.recv(source=status.Get_source(), tag=HERE)
            else:
                time.sleep(0.01)
            self._answer()
        self.reported = True
        if any(r < me for r in answers):
            return                     # a lower rank that answers reports (and aborts)
        silent = [r for r in others if r not in answers]
        line = (f"moempi: error: rank {me}: no progress for {self.timeout:g} s "
                f"(pipeline.stall_timeout): it {self.where()}")
        if silent:
            line += (f"; rank(s) {', '.join(map(str, silent))} did not answer (stopped or "
                     "gone: their data has not arrived)")
        line += "".join(f"; rank {r} {answers[r]}" for r in sorted(answers))
        files.remove_all()
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        time.sleep(0.5)                # the launcher forwards the line before the abort's kill
        MPI.COMM_WORLD.Abort(1)
