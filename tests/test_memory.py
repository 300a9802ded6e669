"""The worker's memory probes, without processes: they never end the heartbeat."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest

from cosyvoiced import memory


def _fake_torch(initializing: bool) -> types.ModuleType:
    module = types.ModuleType("torch")
    module.__spec__ = importlib.machinery.ModuleSpec("torch", None)
    module.__spec__._initializing = initializing  # type: ignore[attr-defined]
    return module  # no `cuda` attribute yet, as while torch/__init__.py runs


def test_a_half_imported_torch_is_not_touched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(initializing=True))
    assert memory.torch_reserved_bytes() is None


def test_a_failing_probe_gives_no_figure_and_is_reported(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(initializing=False))
    failures: list[tuple[str, str]] = []
    figures = memory.measure(lambda probe, error: failures.append((probe, type(error).__name__)))
    assert figures.rss_bytes > 0
    assert figures.torch_reserved_bytes is None
    assert failures == [("torch", "AttributeError")]
