"""fedcredit: federated credit models and encrypted cross-platform debt queries.

This package holds what is neither the bureau's nor a platform's: the command line, the
synthetic population generator and the benchmarks. The Flower apps live in ``server``
and ``clients``; what both sides share lives in ``protocols``.
"""

__version__ = "0.1.0"
