"""The key holder as an HTTP service (FastAPI + uvicorn), run apart from the coordinator.

Why a service: the Paillier private key must live in a process (and ideally on a machine and
under an operator) other than the coordinator's, so the coordinator alone can decrypt
nothing; see ``server/keyholder.py`` for the policy and for what breaks under collusion.

Endpoints (OpenAPI at ``/openapi.json``)
    ``GET /v1/health``  liveness, no authentication, no key material.
    ``GET /v1/key``     the active key's freshly signed ``KeyAnnouncement``.
    ``GET /v1/keys``    announcements of every key (active and retired), no secrets.
    ``POST /v1/decrypt`` ``{key_id, query_id, participants, count, ciphertexts}`` ->
                        ``{key_id, query_id, plaintexts}``; with ``seal_rows`` (needs
                        ``--roster``) -> ``{key_id, query_id, sealed: {platform: base64}}``,
                        the unpacked totals sealed for each participant.

Every ``/v1`` endpoint but health needs ``Authorization: Bearer <token>``; the service keeps
only the token's SHA-256 and compares digests with ``hmac.compare_digest``. Refusals are JSON
``{"error": code, "reason": text}`` with a 4xx status, and are logged. The request body is
read with a hard cap (a maximal batch in base64 plus room) before any parsing, and decoding
and decryption run in a worker thread, so a hostile or huge request can neither exhaust
memory nor stall ``/v1/health``.

Run it with ``fedcredit keyholder serve`` or, equivalently, ``python -m
server.keyholder_service`` with the same flags.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from protocols.key_announcement import KeyAnnouncement
from server.keyholder import (
    ROUTE_DECRYPT,
    ROUTE_HEALTH,
    ROUTE_KEY,
    ROUTE_KEYS,
    DecryptRequest,
    DecryptResponse,
    KeyHolderCore,
    KeyHolderRefusal,
)
from server.keyholder_lender import (
    ROUTE_ANSWER,
    ROUTE_UNBLIND,
    AnswerBody,
    LenderDesk,
    UnblindBody,
    serve_answer,
    serve_unblind,
)
from server.keystore import atomic_write

log = logging.getLogger(__name__)

__all__ = ["KeyHolderServer", "WatchedRoster", "announcement_json", "create_app", "main", "serve"]


def announcement_json(ann: KeyAnnouncement) -> dict[str, Any]:
    """The wire form of an announcement inside JSON: ``KeyAnnouncement.to_bytes`` in base64.

    Carrying the exact ``to_bytes`` output (rather than re-encoding fields) means a client
    verifies precisely what the key holder signed.
    """
    return {"key_id": ann.key_id, "announcement": base64.b64encode(ann.to_bytes()).decode()}


class _Refused(Exception):
    def __init__(self, status: int, code: str, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status, self.code, self.reason, self.headers = status, code, reason, headers


def create_app(core: KeyHolderCore, token_sha256: str, *, max_inflight: int = 4) -> FastAPI:
    """The FastAPI app around ``core``; ``token_sha256`` is the hex SHA-256 of the token.

    ``max_inflight``: decrypt requests read and processed at once (the rest queue), which
    bounds memory at about ``max_inflight`` maximal bodies.
    """
    expected = bytes.fromhex(token_sha256)
    if len(expected) != 32:
        raise ValueError("token_sha256 must be 64 hex characters")
    app = FastAPI(
        title="fedcredit key holder",
        version="1",
        description="Decrypts homomorphic sums for the fedcredit coordinator; never single "
        "contributions (platforms mask them). See server/keyholder.py.",
        docs_url=None,
        redoc_url=None,
    )

    def authenticate(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        ok = hmac.compare_digest(digest, expected)  # computed even without a header
        if scheme.lower() != "bearer" or not token or not ok:
            client = request.client.host if request.client else "?"
            log.warning(
                "refused %s %s from %s: missing or wrong bearer token",
                request.method,
                request.url.path,
                client,
            )
            raise _Refused(
                401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
            )
        return request.client.host if request.client else "?"

    @app.exception_handler(_Refused)
    async def _refused(request: Request, exc: _Refused) -> JSONResponse:
        return JSONResponse({"error": exc.code, "reason": exc.reason}, exc.status, exc.headers)

    @app.exception_handler(KeyHolderRefusal)
    async def _refusal(request: Request, exc: KeyHolderRefusal) -> JSONResponse:
        return JSONResponse({"error": exc.code, "reason": exc.reason}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "invalid", "reason": "invalid request"}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": "http", "reason": str(exc.detail)}, exc.status_code)

    inflight = asyncio.Semaphore(max_inflight)
    desk = LenderDesk(
        lambda: core.keystore, core.audit, min_participants=core.min_participants, clock=core.clock
    )

    @app.post(ROUTE_UNBLIND)
    async def lender_unblind(body: UnblindBody, caller: str = Depends(authenticate)) -> Any:
        """Lender question, step 1 (server/keyholder_lender.py)."""
        return await run_in_threadpool(serve_unblind, desk, body, caller)

    @app.post(ROUTE_ANSWER)
    async def lender_answer(body: AnswerBody, caller: str = Depends(authenticate)) -> Any:
        """Lender question, step 2: totals sealed for the lender (server/keyholder_lender.py)."""
        async with inflight:
            return await run_in_threadpool(serve_answer, desk, body, caller)

    @app.get(ROUTE_HEALTH)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(ROUTE_KEY)
    async def key(caller: str = Depends(authenticate)) -> dict[str, Any]:
        return announcement_json(await run_in_threadpool(core.announcement))

    @app.get(ROUTE_KEYS)
    async def keys(caller: str = Depends(authenticate)) -> dict[str, Any]:
        anns = await run_in_threadpool(core.announcements)
        return {"keys": [announcement_json(a) for a in anns]}

    @app.post(
        ROUTE_DECRYPT,
        response_model=DecryptResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": DecryptRequest.model_json_schema()}},
            }
        },
    )
    async def decrypt(request: Request, caller: str = Depends(authenticate)) -> DecryptResponse:
        # A few requests at a time: each may carry ~100 MB and minutes of CPU; the others wait.
        async with inflight:
            return await _decrypt(request, caller)

    async def _decrypt(request: Request, caller: str) -> DecryptResponse:
        limit = core.max_body_bytes()
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            log.warning(
                "refused decrypt from %s: body of %s bytes over %d", caller, declared, limit
            )
            raise KeyHolderRefusal(f"request body over {limit} bytes", 413, "too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                log.warning("refused decrypt from %s: body over %d bytes", caller, limit)
                raise KeyHolderRefusal(f"request body over {limit} bytes", 413, "too_large")
            chunks.append(chunk)
        body = b"".join(chunks)
        return await run_in_threadpool(core.decrypt_body, body, caller)

    return app


class WatchedRoster:
    """The key holder's copy of the federation roster, re-read when the file changes.

    Only the platforms' X25519 agreement keys are used: totals are sealed for a participant
    under its pinned key, never under a key named in a request. Enrolling a platform edits
    the file; the service picks that up without a restart. An unreadable new version is
    logged and the previous one kept.
    """

    def __init__(self, path: Path) -> None:
        from protocols.identity import load_roster

        self._load = load_roster
        self.path = Path(path)
        self._stamp = self._stat()
        self._keys = self._load(self.path).agreement_keys()  # RosterError propagates at start
        self._lock = threading.Lock()

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def __call__(self) -> dict[str, bytes]:
        with self._lock:
            try:
                stamp = self._stat()
                if stamp != self._stamp:
                    self._stamp = stamp
                    self._keys = self._load(self.path).agreement_keys()
                    log.info(
                        "roster %s changed: reloaded (%d platforms)", self.path, len(self._keys)
                    )
            except Exception:
                log.exception("roster %s cannot be reloaded; keeping the previous one", self.path)
            return dict(self._keys)


class KeyHolderServer(uvicorn.Server):
    """uvicorn's server that writes the bound port to a file once it is listening.

    Why: with ``--listen host:0`` the OS picks the port; a supervisor (tests,
    ``start_keyholder_process``) learns it from the port file, which appears only when the
    service accepts connections.
    """

    def __init__(self, config: uvicorn.Config, port_file: Path | None, port: int) -> None:
        super().__init__(config)
        self.port_file = port_file
        self.bound_port = port

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.port_file is not None:
            atomic_write(self.port_file, f"{self.bound_port}\n".encode(), mode=0o644)
        log.info("key holder listening on port %d", self.bound_port)


def serve(
    app: FastAPI,
    host: str,
    port: int,
    *,
    port_file: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> None:
    """Run ``app`` in this process until SIGINT/SIGTERM, on a socket bound before start."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=10,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        limit_concurrency=64,
    )
    server = KeyHolderServer(config, port_file, bound)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server.keyholder_service``: the ``fedcredit keyholder serve`` flags."""
    import argparse

    from fedcredit import keyholder_cli

    parser = argparse.ArgumentParser(
        prog="python -m server.keyholder_service",
        description="Serve the fedcredit key holder (same flags as `fedcredit keyholder serve`).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    keyholder_cli.add_serve_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return keyholder_cli.run_command(keyholder_cli.cmd_serve, args)


if __name__ == "__main__":
    sys.exit(main())
