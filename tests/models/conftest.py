"""Fixtures for the model-zoo tests (helpers live in ``zoo_testing``)."""

from __future__ import annotations

import pytest

from segflow.models import base


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which one-time warnings were already logged."""
    monkeypatch.setattr(base, "_warned", set())
