"""A host tier of fake adapters for the pool's tests: pages and an identity per name."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass
class FakeHost:
    num_pages: int
    identity: bytes


class FakeTier:
    """Adapters in host RAM, by name -> pages; `reload` gives a name other weights."""

    def __init__(self, pages: dict[str, int]) -> None:
        self.pages = pages
        self.touched: list[str] = []
        self.loads = dict.fromkeys(pages, 0)

    def in_host(self, name: str | None) -> bool:
        return name in self.pages

    def host(self, name: str) -> FakeHost:
        identity = hashlib.sha256(f"{name}/{self.loads[name]}".encode()).digest()
        return FakeHost(self.pages[name], identity)

    def touch(self, name: str) -> None:
        self.touched.append(name)

    def reload(self, name: str) -> None:
        """Another folder is read under `name`: other weights, another identity."""
        self.loads[name] += 1
