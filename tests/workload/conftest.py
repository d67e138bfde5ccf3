"""Fixtures for the workload suite.

The unit tests need nothing; the CLI tests share the SQL suite's small sandbox (Entra, proxy, SQL;
tests/azuresql/sqlbox.py), started once per test process whichever suite asks first.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# The workload package as the image ships it (workload/ on the path), and the shared harness.
sys.path[:0] = [str(_HERE.parents[1] / "workload"), str(_HERE.parent / "azuresql")]

from sqlbox import sqlbox, sqlbox_session  # noqa: E402

__all__ = ["sqlbox", "sqlbox_session"]
