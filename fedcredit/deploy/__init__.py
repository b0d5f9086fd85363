"""Deployment of a fedcredit federation on Flower's deployment engine (SuperLink/SuperNodes).

``init`` writes a folder with every key, certificate and config a bureau and its platforms
need; ``up``/``down`` run that folder's federation on loopback as a try-out. See
``fedcredit deploy --help`` and the generated ``COMMANDS.md``.
"""

from fedcredit.deploy.bundle import DeployError, Manifest, init, load_manifest
from fedcredit.deploy.runner import down, running, up

__all__ = ["DeployError", "Manifest", "down", "init", "load_manifest", "running", "up"]
