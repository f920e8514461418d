"""The one exception type moempi raises for bad input or a failed job, and how any failure is told in one line."""

from __future__ import annotations

import errno
import os
import re
import traceback

DEBUG = False          # `moempi --debug`: tracebacks for failures that are not MoempiError

# what the operating system said, as HDF5 quotes it inside its own messages
_HDF5_ERRNO = re.compile(r"errno = (\d+), error message = '([^']*)'")
_FILE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large for the filesystem or the job's limit",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.EROFS: "read-only filesystem", errno.EISDIR: "is a directory",
                errno.ENOTDIR: "a folder on the path is a file", errno.EIO: "I/O error"}


class MoempiError(Exception):
    """A user-facing error: its message is printed as one line, the job exits non-zero."""


class CollectiveError(MoempiError):
    """An error every rank of the job raises together (agreed or broadcast), so no rank waits."""


def describe(exc: BaseException) -> str:
    """One line for any failure: the message of a MoempiError; out of memory, disk full,
    permission denied and the like said in words; anything else as its type and first
    line (its traceback follows with ``--debug``)."""
    if isinstance(exc, MoempiError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return (f"out of memory ({exc or 'an allocation failed'}): lower "
                "pipeline.batch_tokens or spread the job over more nodes")
    code = getattr(exc, "errno", None)
    found = _HDF5_ERRNO.search(str(exc))
    if found and code is None:
        code = int(found[1])
    if code in _FILE_ERRORS:
        name = getattr(exc, "filename", None)
        if name is None:
            quoted = re.search(r"filename = '([^']*)'", str(exc))
            name = quoted[1] if quoted else None
        where = f"{_published_name(name)}: " if name else ""
        return f"{where}{_FILE_ERRORS[code]} ({os.strerror(code)})"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    hint = "" if DEBUG else " (moempi --debug ... shows the traceback)"
    return f"{type(exc).__name__}: {first}{hint}"


def _published_name(path: str) -> str:
    """A temporary file's name (``.NAME.partial-HOST-PID``) as the file it was to become."""
    head, tail = os.path.split(path)
    m = re.match(r"^\.(.+)\.partial-.+-\d+$", tail)
    return os.path.join(head, m[1]) if m else path


def traceback_text(exc: BaseException) -> str:
    """The traceback, for ``--debug``."""
    return "".join(traceback.format_exception(exc)).rstrip()
