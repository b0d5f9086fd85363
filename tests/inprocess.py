"""The in-process Grid lives in the package (the query benchmark uses it too)."""

from fedcredit.inprocess import InProcessGrid

__all__ = ["InProcessGrid"]
