"""A platform's loan ledger: its schema, how to open it, and how data gets into it.

The ledger is the one place a platform's raw records live. Nothing in it names a person:
borrowers are keyed by the pseudonymous token of ``protocols.tokens``.
"""

from clients.ledger.schema import SCHEMA_VERSION, STATUS_CODES, metadata
from clients.ledger.store import Ledger, LedgerError, open_ledger

__all__ = ["SCHEMA_VERSION", "STATUS_CODES", "Ledger", "LedgerError", "metadata", "open_ledger"]
