"""The abandoned-stream watchdog's rule, on synthetic times.

The live tests prove the watchdog closes vLLM requests of clients that left,
and bench/load.py that it keeps live streams under load. These tests pin down
the rule between them without servers: which waiting stream counts as
abandoned, given what the server pulled and when the process last got CPU.
"""

import time
from types import SimpleNamespace

import pytest
from plugin_loader import load_plugin


@pytest.fixture(scope="module")
def plugin():
    return load_plugin()


@pytest.fixture
def watchdog(plugin):
    dog = plugin.AbandonedStreamWatchdog()
    dog.last_pull = dog.newest_ready_pulled = 100.0
    return dog


def waiting(since):
    return SimpleNamespace(waiting_since=since)


def test_stream_inside_next_is_never_abandoned(watchdog):
    assert not watchdog.is_abandoned(waiting(None), now=200.0)


def test_short_wait_is_not_abandoned(watchdog, plugin):
    now = 100.0 + plugin.ABANDONED_AFTER - 0.05
    watchdog.newest_ready_pulled = 100.5
    assert not watchdog.is_abandoned(waiting(100.0), now)


def test_stream_skipped_for_newer_ones_is_abandoned(watchdog, plugin):
    now = 100.0 + plugin.ABANDONED_AFTER + 0.05
    watchdog.last_pull = now - 0.01
    watchdog.newest_ready_pulled = 100.0 + plugin.PULL_ORDER_SLACK + 0.1
    assert watchdog.is_abandoned(waiting(100.0), now)


def test_stream_pulled_in_turn_but_late_is_kept(watchdog, plugin):
    """Others are pulled, but only ones that became ready before this one."""
    now = 100.0 + plugin.ABANDONED_AFTER + 0.05
    watchdog.last_pull = now - 0.01
    watchdog.newest_ready_pulled = 100.0 + plugin.PULL_ORDER_SLACK - 0.1
    assert not watchdog.is_abandoned(waiting(100.0), now)


def test_nothing_pulled_for_the_limit_is_abandoned(watchdog, plugin):
    now = 100.0 + plugin.ABANDONED_AFTER + 0.05
    watchdog.last_pull = 99.9
    assert watchdog.is_abandoned(waiting(100.0), now)


def test_slow_recent_pulls_raise_the_limit(watchdog, plugin):
    watchdog.pulled(ready_since=time.monotonic() - 1.0)  # a live stream waited 1 s
    delay = watchdog.pull_delay
    assert 0.9 < delay < 2.0
    since = watchdog.last_pull
    now = since + plugin.ABANDONED_AFTER + 0.05
    assert now - since < plugin.PULL_DELAY_FACTOR * delay
    assert not watchdog.is_abandoned(waiting(since), now)
    later = since + plugin.PULL_DELAY_FACTOR * delay + 0.05
    assert watchdog.is_abandoned(waiting(since), later)


def test_wait_counts_from_when_process_got_cpu(watchdog, plugin):
    """After the whole process stalled, waits count from its wake-up."""
    watchdog.last_pull = 100.0
    watchdog.resumed_at = 101.4
    now = 101.5
    assert not watchdog.is_abandoned(waiting(100.0), now)
    assert watchdog.is_abandoned(waiting(100.0), 101.4 + plugin.ABANDONED_AFTER + 0.05)
