"""Security tests: the fixtures of tests/conftest.py (image, scratch paths) are inherited; the
agent API over host envd processes comes from tests/e2b/conftest.py."""

from __future__ import annotations

from tests.e2b.conftest import host_api

__all__ = ["host_api"]
