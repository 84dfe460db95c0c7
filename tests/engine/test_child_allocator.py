"""The engine and worker processes start with jemalloc preloaded (glibc's arenas fragment under varying batch
shapes), unless the user chose otherwise."""

from __future__ import annotations

import os

import pytest

from pagoda import envs
from pagoda.child_allocator import jemalloc_library, preloaded_allocator

needs_jemalloc = pytest.mark.skipif(jemalloc_library() is None, reason="jemalloc is not installed")


@needs_jemalloc
def test_processes_started_inside_preload_jemalloc_and_the_environment_is_restored_after(monkeypatch) -> None:
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("PAGODA_ALLOCATOR", raising=False)
    with preloaded_allocator():
        assert "jemalloc" in os.environ["LD_PRELOAD"]
    assert "LD_PRELOAD" not in os.environ


@needs_jemalloc
def test_a_users_own_preload_is_kept(monkeypatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "libtcmalloc.so.4")
    with preloaded_allocator():
        assert os.environ["LD_PRELOAD"] == "libtcmalloc.so.4"
    assert os.environ["LD_PRELOAD"] == "libtcmalloc.so.4"


def test_system_allocator_preloads_nothing(monkeypatch) -> None:
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv("PAGODA_ALLOCATOR", "system")
    with preloaded_allocator():
        assert "LD_PRELOAD" not in os.environ


def test_an_unknown_allocator_is_refused_by_name(monkeypatch) -> None:
    monkeypatch.setenv("PAGODA_ALLOCATOR", "tcmalloc")
    with pytest.raises(ValueError, match="PAGODA_ALLOCATOR must be 'jemalloc' or 'system', got 'tcmalloc'"):
        envs.allocator()
