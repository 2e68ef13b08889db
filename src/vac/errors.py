"""The one exception type users see: its message is a single line that names the problem."""


class VacError(Exception):
    """A user-facing error (bad path, bad ratio, unsupported architecture, ...)."""
