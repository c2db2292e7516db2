"""The command channel's Kafka batching: one home for its defaults and its consumer options."""

from __future__ import annotations

import pytest

from conntrack.core.commands import FETCH_MIN_BYTES, Batching
from conntrack.core.settings import Settings


def test_defaults_are_the_settings_defaults() -> None:
    settings = Settings()
    assert Batching.of() == Batching(settings.commands_linger_ms, settings.commands_fetch_wait_ms)
    assert Batching.of() == Batching(5, 10)


def test_given_values_win_over_the_defaults() -> None:
    assert Batching.of(linger_ms=0) == Batching(0, 10)
    assert Batching.of(fetch_wait_ms=3) == Batching(5, 3)


def test_a_fetch_waits_for_bytes_or_the_wait() -> None:
    assert Batching(5, 7).consumer_options() == {
        "fetch_min_bytes": FETCH_MIN_BYTES,
        "fetch_max_wait_ms": 7,
    }


def test_no_wait_means_kafkas_defaults_not_a_spinning_consumer() -> None:
    # fetch_max_wait_ms=0 with bytes to wait for would have an idle consumer ask again at once.
    assert Batching(0, 0).consumer_options() == {"fetch_min_bytes": 1, "fetch_max_wait_ms": 500}


@pytest.mark.parametrize(
    "name", ["CONNTRACK_COMMANDS_LINGER_MS", "CONNTRACK_COMMANDS_FETCH_WAIT_MS"]
)
def test_negative_values_are_refused(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, "-1")
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        Settings()
