"""The one exception type moempi raises for bad input or a failed job."""


class MoempiError(Exception):
    """A user-facing error: its message is printed as one line, the job exits non-zero."""


class CollectiveError(MoempiError):
    """An error every rank of the job raises together (agreed or broadcast), so no rank waits."""
