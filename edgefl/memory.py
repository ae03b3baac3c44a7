"""How much memory a process has used at its peak: a figure every role reports."""

from __future__ import annotations


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MB (2**20 bytes).

    On Linux this is VmHWM from /proc, which starts afresh at exec; ``ru_maxrss`` would not: a
    process started from a large parent inherits the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
