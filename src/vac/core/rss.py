"""The resident memory of this process, as the memory tests, benchmarks and reports measure it.

``VmHWM`` (``/proc/self/status``) rather than ``ru_maxrss``: a process started by fork (or vfork) and
exec inherits in ``ru_maxrss`` the RSS of its parent's address space at the exec, so a small
subprocess of a large one (a test's subprocess under a pytest process that has loaded models) would
report the parent's size. ``VmHWM`` belongs to the address space the exec created.
"""

from __future__ import annotations


def status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_rss_bytes() -> int:
    """High-water resident memory of this process (``ru_maxrss`` where there is no ``/proc``)."""
    try:
        return status_kb("VmHWM") * 1024
    except (OSError, KeyError):  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """Resident memory of this process now (0 where there is no ``/proc``)."""
    try:
        return status_kb("VmRSS") * 1024
    except (OSError, KeyError):
        return 0
