"""tests/deploy: its helpers live in deploy_harness (also used by tests/injection)."""
