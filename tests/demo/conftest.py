"""Fixtures of the demo tests (defined in demo_harness.py, imported by name)."""

from demo_harness import cache_dir, demo, random_adapter

__all__ = ["cache_dir", "demo", "random_adapter"]
