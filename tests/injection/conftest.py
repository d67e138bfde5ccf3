"""tests/injection shares deploy_harness (installing deploy/, acting as the operator) with
tests/deploy: make it importable here."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy"))
