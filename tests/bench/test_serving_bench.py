"""bench.serving's throughput estimates, on made-up answer times (no server, no engine)."""

from __future__ import annotations

import pytest

from bench.serving import count_window

PERIOD, CLIENTS = 3.5, 16  # one wave of 16 answers every 3.5 s: 4.571 images/s


def waves(until: float = 60.0) -> list[tuple[float, float]]:
    """(answer time, latency) of a closed loop whose requests always finish together, a wave a period."""
    return [(k * PERIOD, PERIOD) for k in range(1, int(until / PERIOD) + 1) for _ in range(CLIENTS)]


@pytest.mark.parametrize(("begin", "counted"), [(0.1, 128 / 30), (2.0, 144 / 30)])
def test_counting_whole_waves_is_off_by_a_wave_where_little_s_is_not(begin, counted):
    """A 30 s window holds 8 or 9 waves depending on where it starts: 4.267 or 4.8 images/s counted.
    c / mean latency gives 16 / 3.5 wherever the window starts."""
    row = count_window(waves(), begin, begin + 30.0).row(impl="x", concurrency=CLIENTS)
    assert row["images_s"] == pytest.approx(counted, abs=1e-3)
    assert row["little_s"] == pytest.approx(CLIENTS / PERIOD, abs=1e-3)
