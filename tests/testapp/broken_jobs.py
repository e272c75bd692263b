"""A module of an installed app that fails when imported (for tests/test_registry.py)."""
raise RuntimeError('broken_jobs cannot be imported (on purpose)')
