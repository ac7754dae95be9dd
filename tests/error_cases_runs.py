"""Error-table cases: runs (run by tests/test_errors.py; see tests/error_harness.py)."""

from __future__ import annotations

from error_harness import Case

CASES: list[Case] = []
