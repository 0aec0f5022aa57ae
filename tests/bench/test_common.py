"""bench.common.like_an_engine: diffusers raced against the engine runs in a thread of its own."""

from __future__ import annotations

import threading

import pytest

from bench.common import like_an_engine


def test_like_an_engine_returns_what_fn_returns_from_another_thread():
    def add(a, b):
        return a + b, threading.current_thread().name

    assert like_an_engine(add, 2, 3) == (5, "like-an-engine_0")


def test_like_an_engine_raises_what_fn_raised():
    def broken():
        raise ValueError("out of memory")

    with pytest.raises(ValueError, match="out of memory"):
        like_an_engine(broken)
