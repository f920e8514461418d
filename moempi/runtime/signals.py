"""SIGTERM, SIGINT and SIGHUP: every rank removes its temporary files, the job says one line and exits 128 + signal.

The work is done by a watcher thread, not by a Python signal handler: a handler runs only
when the main thread returns to the interpreter, which it does not while it waits inside
MPI (an exchange whose peer is gone can wait for ever) or writes a large HDF5 slab.
``signal.set_wakeup_fd`` hands the signal number to the thread at once.

Under MPI the signal may reach every rank (the launcher forwards it; ``scancel``) or one
rank only (``kill`` of one process).  A rank that receives it tells the others on a
communicator of its own and waits a few seconds for their answer, so every rank has
removed its files before the launcher kills whatever is left.  Rank 0 says the one line.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time

from moempi.io import files

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP, ACK, GO = 7101, 7102, 7103      # message tags on the relay's own communicator
ANSWER_WAIT = 3.0           # seconds a rank waits for the others to have cleaned up
EXIT_DELAY = 0.5            # seconds from "go" to every rank's exit (the message's way)
POLL = 0.5                  # seconds between the watcher's looks at the relay (few: it takes MPI's lock)

_stopping = threading.Event()
_relays: list = []


def stopping() -> bool:
    """Whether this process is ending on a signal (other errors then stay silent)."""
    return _stopping.is_set()


def install(comm=None) -> None:
    """Handle the signals from now on; call from the main thread, on every rank of ``comm``
    together (it duplicates ``comm``), or with ``comm=None`` in a serial command."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)
    for sig in SIGNALS:
        signal.signal(sig, _ignore)          # the wakeup fd carries it to the watcher
    relay = None
    if comm is not None and comm.size > 1:
        from mpi4py import MPI
        if MPI.Query_thread() == MPI.THREAD_MULTIPLE:    # the watcher calls MPI too
            relay = _Relay(comm.Dup())
            _relays.append(relay)
    threading.Thread(target=_watch, args=(read_fd, relay), name="moempi-signals",
                     daemon=True).start()


def close() -> None:
    """Before MPI finalises, on every rank together: stop relaying (its pending receive
    cancelled); a signal then still removes this rank's files."""
    while _relays:
        _relays.pop().close()


def _ignore(signum, frame) -> None:
    """The Python-level handler: nothing; the watcher thread acts."""


def _watch(fd: int, relay) -> None:
    while True:
        ready, _, _ = select.select([fd], [], [], POLL if relay else None)
        if ready:
            sig = os.read(fd, 1)[0]
            if sig in SIGNALS:
                _stop(sig, relay, origin=None)
        elif relay is not None:
            if relay.closed:
                relay = None
                continue
            told = relay.told()
            if told:
                _stop(told[0], relay, told[1])


def _stop(sig: int, relay, origin) -> None:
    """End this process on ``sig``, received here (``origin`` None) or relayed from a rank."""
    _stopping.set()
    removed = files.remove_all()
    name = signal.Signals(sig).name
    if relay is not None and relay.closed:      # the job's end: only this rank's files left
        relay = None
    if relay is None:
        what = f"; removed {', '.join(removed)}" if removed else ""
        _say(f"moempi: stopped by {name}{what}")
    else:
        rank = relay.comm.rank
        where = "" if origin is None else f" (on rank {origin})"
        if rank == 0:
            _say(f"moempi: stopped by {name}{where}; every rank removed its temporary files")
        if origin is None:
            heard_rank0, exit_at = relay.tell_all(sig)
            if rank != 0 and not heard_rank0:
                _say(f"moempi: rank {rank}: stopped by {name} (rank 0 did not answer)")
        else:
            exit_at = relay.answer(origin)
        # every rank exits at the same moment: the launcher kills (SIGKILL) the ranks still
        # running when the first one exits, and reports that instead of 128 + signal
        time.sleep(max(0.0, exit_at - time.time()))
    os._exit(128 + sig)


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class _Relay:
    """The ranks' signal messages: ``[signal, origin rank]`` int32 on a duplicate communicator."""

    def __init__(self, comm):
        import numpy as np
        from mpi4py import MPI
        self.comm, self.np, self.any = comm, np, MPI.ANY_SOURCE
        self.msg = np.zeros(2, dtype=np.int32)
        self.request = comm.Irecv(self.msg, source=self.any, tag=STOP)
        self.sent = []               # requests (and their buffers) kept until the process ends
        self.lock = threading.Lock()
        self.closed = False

    def close(self) -> None:
        with self.lock:
            self.request.Cancel()
            self.request.Wait()
            self.closed = True
            self.comm.Free()

    def told(self):
        """``(signal, origin)`` when another rank relayed a signal, else None."""
        with self.lock:
            if self.closed or not self.request.Test():
                return None
            got = int(self.msg[0]), int(self.msg[1])
            self.request = self.comm.Irecv(self.msg, source=self.any, tag=STOP)   # the next
            return got

    def _send(self, dest: int, tag: int, values, dtype=None):
        buf = self.np.array(values, dtype=dtype or self.np.int32)
        req = self.comm.Isend(buf, dest=dest, tag=tag)
        self.sent.append((req, buf))
        return req

    def _answer_others(self) -> None:
        """Answer a rank that relays a signal of its own meanwhile."""
        told = self.told()
        if told:
            self._send(told[1], ACK, [0])

    def _wait(self, requests: dict) -> None:
        """Until every request of ``requests`` (rank -> request) is done or the time is up."""
        deadline = time.monotonic() + ANSWER_WAIT
        while requests and time.monotonic() < deadline:
            for r in [r for r, req in requests.items() if req.Test()]:
                del requests[r]
            self._answer_others()
            time.sleep(0.01)

    def answer(self, origin: int) -> float:
        """Tell ``origin`` this rank has cleaned up; returns the time (``time.time()``) it
        sets for every rank to exit (now, if it does not say)."""
        self._send(origin, ACK, [0])
        go = self.np.zeros(1, dtype=self.np.float64)
        self._wait({origin: self.comm.Irecv(go, source=origin, tag=GO)})
        return float(go[0])

    def tell_all(self, sig: int) -> tuple[bool, float]:
        """Relay ``sig`` to every other rank, wait (bounded) for their answers, then tell them
        when to exit.  Returns whether rank 0 answered, and that time."""
        np, comm, me = self.np, self.comm, self.comm.rank
        others = [r for r in range(comm.size) if r != me]
        for r in others:
            self._send(r, STOP, [sig, me])
        waiting = {r: comm.Irecv(np.zeros(1, dtype=np.int32), source=r, tag=ACK)
                   for r in others}
        self._wait(waiting)
        exit_at = time.time() + EXIT_DELAY
        for r in others:
            self._send(r, GO, [exit_at], np.float64)
        return me == 0 or 0 not in waiting, exit_at
