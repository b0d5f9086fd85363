"""Peak memory of this process and the workers it forked."""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """Largest resident set of this process or any waited-for child, in MiB."""
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * scale / 2**20
