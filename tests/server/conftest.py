"""Fixtures of the server tests (defined in server_harness.py, imported by name)."""

from server_harness import assets, running

__all__ = ["assets", "running"]
