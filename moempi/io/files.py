"""Output files written safely: temporary names, no-replace publishing, inputs protected, stale temporaries swept."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import threading

from moempi.errors import MoempiError

_HOST = socket.gethostname().split(".")[0]
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<host>.+)-(?P<pid>\d+)$")


def partial_name(path: str) -> str:
    """The temporary name of ``path`` for this process: ``.NAME.partial-HOST-PID`` beside it.

    Host and pid in the name let a later command tell a dead process's leftover
    (:func:`sweep`) from a file another job is writing now.
    """
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.partial-{_HOST}-{os.getpid()}")


# The guard: a small process of its own session that outlives this one.  It learns each
# temporary file as it is registered or released and, when this process is gone without
# releasing them (SIGKILL, the out-of-memory killer, MPICH's proxy ending the ranks when
# mpiexec dies of a hangup it does not forward), removes them.  It ignores the signals a
# job's processes get together, so the ranks' own handling (moempi.runtime.signals) comes first.
_GUARD = r"""
import os, signal, sys
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
paths = set()
for line in sys.stdin.buffer:
    path = os.fsdecode(bytes.fromhex(line[1:].decode()))
    (paths.add if line[:1] == b"+" else paths.discard)(path)
for path in paths:
    try:
        os.unlink(path)
    except OSError:
        pass
"""


class _Registry:
    """This process's temporary files, so a signal handler can remove them (:func:`remove_all`)
    and the guard process can when this process is killed."""

    def __init__(self):
        self.lock = threading.Lock()
        self.paths: set[str] = set()
        self.closed = False
        self.guard = None
        self.guard_pid = None

    def _tell(self, sign: bytes, path: str) -> None:
        """Tell the guard (started with the first file, by this process: not a fork's)."""
        if self.guard_pid != os.getpid():
            self.guard_pid = os.getpid()
            try:
                self.guard = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _GUARD], stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True, bufsize=0)
            except OSError:
                self.guard = None           # no guard: the next writer's sweep still works
        if self.guard is not None:
            try:
                self.guard.stdin.write(sign + os.fsencode(path).hex().encode() + b"\n")
            except OSError:
                self.guard = None

    def add(self, path: str) -> None:
        with self.lock:
            if not self.closed:
                self.paths.add(path)
                self._tell(b"+", path)
                return
        threading.Event().wait()      # the process is stopping: never create another file

    def discard(self, path: str) -> None:
        with self.lock:
            if path in self.paths:
                self.paths.discard(path)
                self._tell(b"-", path)


_registry = _Registry()


def remove_all() -> list[str]:
    """Remove every temporary file of this process and refuse new ones; returns those removed."""
    with _registry.lock:
        _registry.closed = True
        paths = sorted(_registry.paths)
    removed = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed


def register(path: str) -> str:
    """The temporary name of ``path``, registered before the file exists (a signal may come
    at any time); :func:`release` removes it unless it was published."""
    tmp = partial_name(path)
    _registry.add(tmp)
    return tmp


def release(tmp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    _registry.discard(tmp)


@contextlib.contextmanager
def temporary(path: str):
    """:func:`register` for the ``with`` block, :func:`release` after it."""
    tmp = register(path)
    try:
        yield tmp
    finally:
        release(tmp)


def publish(tmp: str, path: str, overwrite: bool) -> None:
    """Give the complete file ``tmp`` its name ``path``.

    With ``overwrite`` an atomic rename (a reader sees the old file or the new one).
    Without it a hard link, which fails if ``path`` exists: a file that appeared since the
    start-up check (another job with the same output) is never replaced.
    """
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise MoempiError(f"{path}: appeared while this job ran (another job writing the same "
                          "file?); it was not replaced (pass --overwrite to replace it)") from None
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise MoempiError(f"{path}: this filesystem cannot publish a file without risking "
                              f"to replace another ({exc.strerror}): pass --overwrite") from None
        raise
    os.unlink(tmp)


def check_free_space(path: str, nbytes: int) -> None:
    """Refuse, before writing, a file of ``nbytes`` that the filesystem of ``path`` cannot hold
    (the temporary file is written whole beside ``path`` before it replaces anything)."""
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise MoempiError(f"{path}: needs {nbytes / 2**30:,.2f} GiB but {folder} has "
                          f"{free / 2**30:,.2f} GiB free")


def same_file(a: str, b: str) -> bool:
    """Whether two paths name the same existing file (by any path: links, ``..``, symlinks)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(path: str, inputs: dict[str, str], what: str = "output") -> None:
    """Refuse an output (or checkpoint) path that is one of the job's input files."""
    for name, source in inputs.items():
        if source and same_file(path, source):
            raise MoempiError(f"{path}: the {what} is the {name} file {source}; writing it "
                              f"would destroy the input (choose another {what} path)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                   # someone else's process
    return True


def sweep(path: str) -> list[str]:
    """Temporary files of ``path`` (or of every file in ``path`` if it is a folder) left by others.

    Those of a process of this host that is gone are removed; those of a live process, or
    of another host, are kept.  Returns one line per file, to be shown as a warning.
    """
    if os.path.isdir(path):
        folder, target = path, None
    else:
        folder, target = os.path.split(os.path.abspath(path))
    notes = []
    try:
        names = os.listdir(folder)
    except OSError:
        return notes
    for entry in sorted(names):
        m = _PARTIAL.match(entry)
        if not m or (target is not None and m["name"] != target):
            continue
        full, pid = os.path.join(folder, entry), int(m["pid"])
        if m["host"] == _HOST and pid == os.getpid():
            continue
        if m["host"] == _HOST and not _alive(pid):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(full)
            notes.append(f"removed {full}, a temporary file left by process {pid}, which is gone")
        else:
            notes.append(f"{full} is a temporary file of process {pid} on {m['host']}, which may "
                         "still be writing it (remove it if that job is over)")
    return notes
