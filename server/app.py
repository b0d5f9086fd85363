"""The bureau's ServerApp: the same object on Flower's simulation and deployment engines.

Settings come from the run config (``[tool.flwr.app.config]``, overridden with
``flwr run --run-config``). ``build_server_app`` exists for ``fedcredit demo``, which drives
the simulation engine from Python, where Flower passes no run config: it bakes overrides in.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import run_federation
from server.keyholder_client import KeyHolderAPI
from server.settings import FederationSettings

log = logging.getLogger(__name__)


def build_server_app(
    overrides: Mapping[str, object] | None = None, keyholder: KeyHolderAPI | None = None
) -> ServerApp:
    """The ServerApp; ``keyholder`` replaces the run config's key holder service (tests)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = FederationSettings.from_run_config(
            {**dict(context.run_config), **dict(overrides or {})}
        )
        if settings.serve_config:  # the standing lender service (docs/lender-query.md)
            from server.lender_service import run_service

            run_service(grid, settings, keyholder)
            return
        summary = run_federation(grid, settings, keyholder)
        log.info(
            "federation finished: %s",
            {k: summary.get(k) for k in ("federated", "federated_cross_platform", "queries")},
        )

    return app


app = build_server_app()
