"""Fixtures of the server tests (defined in server_harness.py, imported by name)."""

from server_harness import assets, http, running

__all__ = ["assets", "http", "running"]
