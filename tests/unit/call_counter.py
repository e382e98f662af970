"""Counting (or forbidding) the calls of one of gptkit's functions in a test, by wrapping it with
pytest's monkeypatch (shared by test_attention_kernel.py and test_fused_trunk.py; pytest puts this
folder on sys.path)."""

from __future__ import annotations

from types import ModuleType

import pytest


class Calls:
    """Counts the calls of ``module.name`` in ``self.count``; with ``allowed=False`` a call fails the
    test with ``forbidden``. The original function still runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: ModuleType, name: str, *, allowed: bool,
                 forbidden: str) -> None:
        self.count = 0
        original = getattr(module, name)

        def counting(*args, **kwargs):
            assert allowed, forbidden
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
