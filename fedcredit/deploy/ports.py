"""Free local ports for a one-machine deployment (tests and benchmarks).

A deployment's SuperNodes take consecutive runtime ports (``supernode_base_port``,
``+ 1``, ...: ``fedcredit deploy init``), so a base port that is free is not enough: the
ports after it may belong to something else (a test run saw a SuperNode die with "address
already in use" on base + 1). ``free_port_block`` checks every port of the block.

The operating system may still hand a checked port to another socket before the server
binds it (the classic race); the deployment's readiness checks turn that rare case into a
clear error instead of a hang.
"""

from __future__ import annotations

import socket
from collections.abc import Collection

MAX_PORT = 65_535


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port_block(
    count: int = 1, host: str = "127.0.0.1", avoid: Collection[int] = (), attempts: int = 200
) -> int:
    """The first of ``count`` consecutive ports that are all free now and not in ``avoid``."""
    if count < 1:
        raise ValueError("a block needs at least one port")
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            base = int(sock.getsockname()[1])
        block = range(base, base + count)
        if block[-1] > MAX_PORT or any(p in avoid for p in block):
            continue
        if all(_bindable(host, p) for p in block[1:]):
            return base
    raise RuntimeError(f"no {count} consecutive free ports on {host}")
