"""service/throttled_log.py: one warning per interval and kind, the rest counted (a fake clock)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from service import auth
from service.throttled_log import ThrottledLog

LOGGER = "tests.throttled"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _lines(caplog: pytest.LogCaptureFixture, name: str = LOGGER) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name]


def test_one_line_per_interval_and_the_count_of_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    throttled = ThrottledLog(logging.getLogger(LOGGER), every_s=10.0, clock=clock)
    caplog.set_level(logging.WARNING, LOGGER)

    assert throttled.warning("431", "refused %s", "a") is True
    for t in (1.0, 5.0, 9.99):  # within the interval: counted, not logged
        clock.t = 1000.0 + t
        assert throttled.warning("431", "refused %s", "b") is False
    assert _lines(caplog) == ["refused a"]

    clock.t = 1010.0  # the interval has passed: logged, standing for the three counted
    assert throttled.warning("431", "refused %s", "c") is True
    clock.t = 1021.0  # nothing counted since: no count
    assert throttled.warning("431", "refused %s", "d") is True
    assert _lines(caplog) == [
        "refused a",
        "refused c (and 3 more since the last such line)",
        "refused d",
    ]


def test_kinds_are_throttled_apart(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    throttled = ThrottledLog(logging.getLogger(LOGGER), every_s=10.0, clock=clock)
    caplog.set_level(logging.WARNING, LOGGER)
    assert throttled.warning("head", "head")
    assert throttled.warning("body", "body")  # another kind is not held back by the first
    assert not throttled.warning("head", "head again")
    clock.t += 10.0
    assert throttled.warning("body", "body again")  # no "head" was counted against it
    assert _lines(caplog) == ["head", "body", "body again"]


def test_a_callers_clock_reading_is_used(caplog: pytest.LogCaptureFixture) -> None:
    """`now` (the event loop's time, in the HTTP protocol) takes the place of the clock."""
    throttled = ThrottledLog(logging.getLogger(LOGGER), every_s=10.0, clock=Clock())
    caplog.set_level(logging.WARNING, LOGGER)
    assert throttled.warning("cap", "x", now=5.0)
    assert not throttled.warning("cap", "x", now=14.0)
    assert throttled.warning("cap", "x", now=15.0)
    assert _lines(caplog) == ["x", "x (and 1 more since the last such line)"]


def test_wrong_admin_tokens_go_through_it(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TokenGuard logs one wrong-token line per LOG_EVERY_S, counting the others."""
    clock = Clock()
    monkeypatch.setattr(auth, "time", SimpleNamespace(monotonic=clock))  # auth's clock only
    guard = auth.TokenGuard(b"secret")
    caplog.set_level(logging.WARNING, auth.log.name)
    for t in (0.0, 1.0, 2.0, auth.LOG_EVERY_S + 0.5):
        clock.t = 1000.0 + t
        assert guard.check("Bearer wrong", "10.0.0.1") == (403, "admin endpoint: wrong token")
    line = f"admin endpoint: wrong token from 10.0.0.1; %d of {auth.MAX_FAILURES} allowed per 60 s"
    assert _lines(caplog, auth.log.name) == [
        line % 1,
        line % 4 + " (and 2 more since the last such line)",
    ]
