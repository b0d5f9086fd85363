"""``fedcredit query``: a lender asks the bureau about applicants, by national ID.

The IDs never leave this process: they are tokenised with the platforms' token pepper,
blinded, and signed over with the lender's consent key (``fedcredit.lender_client``); the
totals come back sealed for a one-time answer key only this process holds. The key holder's
delivery key comes from ``GET /v1/key`` and is used only after its announcement verifies
against the key holder's signing key pinned in the deployment's roster.
"""

from __future__ import annotations

import argparse
import base64
import json
import ssl
import sys
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcredit.lender_client import (
    PreparedQuestion,
    open_answers,
    prepare_question,
    prepare_tokens,
)
from protocols.key_announcement import KeyAnnouncement, verify_announcement
from protocols.tokens import read_federation_key


class LenderError(RuntimeError):
    """The bureau refused the question or could not be reached; the message says why."""


class Lender:
    """An importable lender client: ``Lender(...).ask(["110105..."])``."""

    def __init__(
        self,
        url: str,
        *,
        lender: str,
        api_key: str,
        signing_key: Ed25519PrivateKey,
        pepper: bytes,
        keyholder_verify_key: bytes,
        ca_file: str | Path | None = None,
        timeout: float = 60.0,
    ) -> None:
        verify: Any = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        self.http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            verify=verify,
            timeout=timeout,
        )
        self.lender, self.signing_key, self.pepper = lender, signing_key, pepper
        self.keyholder_verify_key = keyholder_verify_key
        self._delivery_key: bytes | None = None

    def delivery_key(self) -> bytes:
        """The key holder's delivery key, from its verified signed announcement."""
        if self._delivery_key is None:
            data = self._call("GET", "/v1/key")
            ann = KeyAnnouncement.from_bytes(base64.b64decode(data["announcement"]))
            verify_announcement(ann, self.keyholder_verify_key)
            if ann.delivery_key is None:
                raise LenderError("the key holder's key has no delivery key")
            self._delivery_key = ann.delivery_key
        return self._delivery_key

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise LenderError(f"{self.http.base_url}{path}: {exc}") from None
        try:
            data = r.json()
        except ValueError:
            data = {}
        if r.status_code != 200:
            raise LenderError(f"HTTP {r.status_code}: {data.get('reason', r.text[:300])}")
        return data

    def prepare(self, national_ids: list[str], purpose: str) -> PreparedQuestion:
        return prepare_question(
            national_ids,
            pepper=self.pepper,
            lender=self.lender,
            signing_key=self.signing_key,
            purpose=purpose,
            delivery_key=self.delivery_key(),
        )

    def prepare_tokens(self, tokens: list[str], purpose: str) -> PreparedQuestion:
        """For tests and benchmarks, which know ledger tokens rather than IDs."""
        return prepare_tokens(
            tokens,
            lender=self.lender,
            signing_key=self.signing_key,
            purpose=purpose,
            delivery_key=self.delivery_key(),
        )

    def send(self, prepared: PreparedQuestion) -> dict[str, Any]:
        path = "/v1/debt-profile" if len(prepared.keep) == 1 else "/v1/debt-profile/batch"
        answer = self._call("POST", path, json=prepared.body)
        return {**answer, "applicants": open_answers(prepared, answer)}

    def ask(self, national_ids: list[str], purpose: str = "underwriting") -> dict[str, Any]:
        """The bureau's answer with every applicant's totals opened."""
        return self.send(self.prepare(national_ids, purpose))


def lender_from_folder(out: Path, lender: str, url: str, timeout: float = 60.0) -> Lender:
    """A lender client from a ``fedcredit deploy init`` folder's files (a try-out's setup)."""
    from protocols.identity import load_roster

    key = serialization.load_pem_private_key(
        (out / "lenders" / f"{lender}.key").read_bytes(), password=None
    )
    if not isinstance(key, Ed25519PrivateKey):
        raise LenderError(f"{lender}.key is not an Ed25519 key")
    roster = load_roster(out / "bureau" / "roster.json")
    if not roster.keyholder_signing_key:
        raise LenderError("the roster pins no key holder signing key")
    return Lender(
        url,
        lender=lender,
        api_key=(out / "lenders" / f"{lender}.api-key").read_text().strip(),
        signing_key=key,
        pepper=read_federation_key(_pepper_file(out)),
        keyholder_verify_key=bytes.fromhex(roster.keyholder_signing_key),
        ca_file=out / "ca" / "ca.pem",
        timeout=timeout,
    )


def _pepper_file(out: Path) -> Path:
    for candidate in sorted(out.rglob("federation.key")):
        return candidate
    raise LenderError(f"no federation.key (the token pepper) under {out}")


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "query",
        help="a lender asks the bureau what applicants owe (IDs stay on the lender's side)",
    )
    p.add_argument("ids", nargs="+", help="national IDs of the applicants")
    p.add_argument("--dir", type=Path, required=True, help="deployment folder (lender files)")
    p.add_argument("--lender", default="lender-01")
    p.add_argument("--purpose", default="underwriting")
    p.add_argument("--url", default=None, help="the API (default: from DIR's serve.toml)")
    p.set_defaults(func=cmd_query)
    return p


def cmd_query(args: argparse.Namespace) -> int:
    from fedcredit.serve_cli import api_url, ensure_serve_config

    url = args.url or api_url(ensure_serve_config(args.dir.resolve()))
    try:
        answer = lender_from_folder(args.dir.resolve(), args.lender, url).ask(
            args.ids, args.purpose
        )
    except (LenderError, ValueError) as exc:
        print(f"fedcredit query: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0
