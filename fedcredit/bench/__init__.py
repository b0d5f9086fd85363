"""Benchmarks: each prints its figures and a ratio against a baseline measured in the same run.

Reachable as ``fedcredit bench NAME [--json]``. Machines are noisy, so targets are checked
here and reported, never asserted in the test suite.
"""
