"""The publisher's durable spool (producer/spool.py) against a private real broker this module
stops and starts (the shared one must stay up): a long outage loses nothing, a gateway killed
with SIGKILL while events sit in the spool delivers them after its restart, and a full spool
refuses events the way docs/producer.md says."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conntrack.core.events import Event
from conntrack.producer.errors import (
    DeliveryTimeoutError,
    PublisherError,
    SpoolFullError,
    UndeliveredEventsError,
)
from conntrack.producer.publisher import Publisher
from conntrack.producer.spool_files import SEGMENT_SUFFIX
from conntrack.producer.topics import TopicSpec, ensure_topics
from tests.conftest import REPO, PrivateBroker
from tests.support.events import T0
from tests.support.kafka import read_events, unique

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _first_seen_in_order(got: list[Event]) -> dict[str, list[int]]:
    """Each connection's event times in the order they first appear in the topic (a replayed
    copy of an event that did arrive after all is a later duplicate, which the fold ignores)."""
    seen: set[str] = set()
    times: dict[str, list[int]] = {}
    for event in got:
        if event.event_id not in seen:
            seen.add(event.event_id)
            times.setdefault(event.connection_id, []).append(event.occurred_at_ns)
    return times


async def _flush_until_delivered(pub: Publisher, attempts: int = 30) -> None:
    for _ in range(attempts):
        try:
            await pub.flush()
            return
        except DeliveryTimeoutError:
            pass  # still in flight or in the spool
    pytest.fail(f"the spool was not delivered: {pub.stats()}")


async def test_an_outage_longer_than_the_delivery_timeout_loses_nothing(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """Events keep coming through an outage of four delivery timeouts: the ones that failed and
    every one handed in after them go to the spool, and once the broker is back each event is
    in the topic, in the order it was handed in per connection, and nothing was reported."""
    await private_broker.up()
    topic = unique("events")
    await ensure_topics(private_broker.bootstrap, [TopicSpec(topic, 3, 1, 1)])
    failed: list[Event] = []
    spool_dir = tmp_path / "spool"
    pub = Publisher(
        private_broker.bootstrap,
        topic,
        "gw",
        delivery_timeout_s=2,
        activity_interval_s=0,
        spool_dir=spool_dir,
        on_undeliverable=lambda event, _: failed.append(event),
    )
    await pub.start()
    handed: list[Event] = []

    async def pump(n: int, pause_s: float) -> None:
        for _ in range(n):
            i = len(handed)
            event = await pub.activity(f"c{i % 8}", at_ns=T0 + i)
            assert event is not None  # activity_interval_s=0: every call publishes
            handed.append(event)
            await asyncio.sleep(pause_s)

    await pump(100, 0.005)
    await private_broker.down()
    await pump(800, 0.01)  # about 8 s of outage (the down itself takes a few more)
    spooled_in_outage = pub.stats()
    await private_broker.up()
    await pump(200, 0.005)
    await _flush_until_delivered(pub)
    await pub.stop()

    stats = pub.stats()
    print(f"outage: {spooled_in_outage}; end: {stats}")
    assert failed == []
    assert stats.undelivered == 0
    assert spooled_in_outage.spooled > 0, "nothing went to the spool: no outage was seen"
    # Each event acknowledged once at least: live, or replayed from the spool (a spooled copy of
    # an in-flight event acknowledged after all is skipped, or replayed: a duplicate).
    assert stats.replayed <= stats.spooled
    assert stats.delivered + stats.replayed >= len(handed)
    assert stats.spool_pending == 0
    assert stats.spool_refused == 0
    assert list(spool_dir.glob("*" + SEGMENT_SUFFIX)) == []  # acknowledged segments are gone

    got = await read_events(private_broker.bootstrap, topic, partitions=3)
    assert {e.event_id for e in got} == {e.event_id for e in handed}
    times = _first_seen_in_order(got)
    for connection_id, seen in times.items():
        expected = [e.occurred_at_ns for e in handed if e.connection_id == connection_id]
        assert seen == expected, f"{connection_id}: not in the order handed in"
    print(f"{len(got)} records for {len(handed)} events ({len(got) - len(handed)} duplicates)")


_GATEWAY = textwrap.dedent(
    """
    import asyncio, contextlib, json, sys
    from conntrack.producer.errors import DeliveryTimeoutError
    from conntrack.producer.publisher import Publisher

    T0 = 1_764_300_000_000_000_000

    async def main(bootstrap, topic, spool_dir, first, live, outage, after):
        pub = Publisher(bootstrap, topic, "gw", delivery_timeout_s=2, activity_interval_s=0,
                        spool_dir=spool_dir)
        await pub.start()
        print("started", json.dumps(pub.stats().spool_pending), flush=True)
        n = first
        for _ in range(live):
            await pub.activity(f"c{n % 4}", at_ns=T0 + n); n += 1
        if live:
            await pub.flush()
        print("live", flush=True)
        if outage:
            sys.stdin.readline()  # the broker is down now
            for _ in range(outage):
                await pub.activity(f"c{n % 4}", at_ns=T0 + n); n += 1
                await asyncio.sleep(0.02)
            while pub.stats().spool_pending < outage:
                await asyncio.sleep(0.1)
            with contextlib.suppress(DeliveryTimeoutError):
                await pub.flush()  # the spool is on disk when flush gets past it
            print("spooled", json.dumps(pub.stats().spool_pending), flush=True)
            await asyncio.sleep(3600)  # until SIGKILL
        for _ in range(after):
            await pub.activity(f"c{n % 4}", at_ns=T0 + n); n += 1
        for _ in range(30):
            try:
                await pub.flush()
                break
            except DeliveryTimeoutError:
                pass
        await pub.stop()
        s = pub.stats()
        print("done", json.dumps({"replayed": s.replayed, "delivered": s.delivered,
                                  "pending": s.spool_pending, "undelivered": s.undelivered}),
              flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:])))
    """
)


def _gateway(bootstrap: str, topic: str, spool_dir: Path, *counts: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _GATEWAY, bootstrap, topic, str(spool_dir), *map(str, counts)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


async def _line(proc: subprocess.Popen[str], starts: str, timeout_s: float = 60) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout_s)
    if not line.startswith(starts):
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"expected {starts!r}, got {line!r}; stderr:\n{err}")
    return line.split(" ", 1)[1] if " " in line else ""


async def test_events_in_the_spool_survive_sigkill_and_are_delivered_after_a_restart(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    await private_broker.up()
    topic = unique("events")
    await ensure_topics(private_broker.bootstrap, [TopicSpec(topic, 3, 1, 1)])
    spool_dir = tmp_path / "spool"
    live, outage, after = 20, 60, 20

    first = _gateway(private_broker.bootstrap, topic, spool_dir, 0, live, outage, 0)
    try:
        await _line(first, "started")
        await _line(first, "live")
        await private_broker.down()
        assert first.stdin is not None
        first.stdin.write("go\n")
        first.stdin.flush()
        spooled = json.loads(await _line(first, "spooled", timeout_s=120))
        assert spooled >= outage
    finally:
        first.send_signal(signal.SIGKILL)  # no stop(), no flush: what is on disk is all there is
        first.wait(30)
        first.communicate()
    assert first.returncode == -signal.SIGKILL

    await private_broker.up()
    second = _gateway(private_broker.bootstrap, topic, spool_dir, live + outage, 0, 0, after)
    try:
        assert json.loads(await _line(second, "started")) == spooled
        await _line(second, "live")
        done = json.loads(await _line(second, "done", timeout_s=120))
        second.wait(30)
    finally:
        if second.poll() is None:
            second.kill()
        _, err = second.communicate()
    assert second.returncode == 0, err
    # The new events went behind the spool if it was not delivered yet: replayed, or live.
    assert done["replayed"] >= spooled
    assert done["replayed"] + done["delivered"] == spooled + after
    assert (done["pending"], done["undelivered"]) == (0, 0)

    got = await read_events(private_broker.bootstrap, topic, partitions=3)
    n = live + outage + after
    assert sorted({e.occurred_at_ns - T0 for e in got}) == list(range(n))
    for connection_id, seen in _first_seen_in_order(got).items():
        assert seen == sorted(seen), f"{connection_id}: out of order"
        assert len(seen) == n // 4


async def test_a_full_spool_refuses_new_events_counted_and_reported(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """At its bound the spool keeps what it holds and refuses the newest event: the call raises
    SpoolFullError, the event goes to on_undeliverable and is counted; the kept events are
    delivered, in order, once the broker is back, and none of the refused ones is."""
    await private_broker.up()
    topic = unique("events")
    await ensure_topics(private_broker.bootstrap, [TopicSpec(topic, 1, 1, 1)])
    failed: list[tuple[Event, BaseException]] = []
    spool_dir = tmp_path / "spool"
    max_bytes = 4096
    pub = Publisher(
        private_broker.bootstrap,
        topic,
        "gw",
        delivery_timeout_s=1,
        activity_interval_s=0,
        spool_dir=spool_dir,
        spool_max_bytes=max_bytes,
        on_undeliverable=lambda event, error: failed.append((event, error)),
    )
    await pub.start()
    await private_broker.down()
    accepted: list[Event] = []
    first = await pub.activity("c", at_ns=T0)
    assert first is not None
    accepted.append(first)
    for _ in range(100):  # the first failure puts the publisher in spooling mode
        if pub.stats().spooled:
            break
        await asyncio.sleep(0.1)
    assert pub.stats().spooled == 1

    refused: list[PublisherError] = []
    for i in range(1, 200):
        try:
            event = await pub.activity("c", at_ns=T0 + i)
        except SpoolFullError as exc:
            refused.append(exc)
        else:
            assert event is not None
            accepted.append(event)
    assert refused, "the spool never filled"
    assert "full" in str(refused[0])
    stats = pub.stats()
    assert stats.spool_refused == len(refused) == stats.undelivered
    assert [type(error) for _, error in failed] == [SpoolFullError] * len(refused)
    assert stats.spool_bytes <= max_bytes
    assert stats.spool_pending == len(accepted)
    assert sum(p.stat().st_size for p in spool_dir.glob("*" + SEGMENT_SUFFIX)) <= max_bytes

    await private_broker.up()
    raised: list[type[Exception]] = []
    for _ in range(30):
        try:
            await pub.flush()
            break
        except (DeliveryTimeoutError, UndeliveredEventsError) as exc:
            raised.append(type(exc))
    assert raised.count(UndeliveredEventsError) == 1  # the refusals, raised once more here
    again = await pub.activity("c", at_ns=T0 + 1000)  # room again, and straight to the broker
    assert again is not None
    await pub.flush()
    await pub.stop()
    assert pub.stats().spool_pending == 0

    got = await read_events(private_broker.bootstrap, topic, partitions=1)
    ids = [e.event_id for e in got]
    assert list(dict.fromkeys(ids)) == [e.event_id for e in [*accepted, again]]
    assert not {e.event_id for e, _ in failed} & set(ids)


def test_the_gateway_takes_the_spool_setting_and_says_when_it_cannot_use_it(
    tmp_path: Path,
) -> None:
    """conntrack-gateway hands CONNTRACK_GATEWAY_SPOOL_DIR to its Publisher, which opens the spool
    before connecting: a directory it cannot use is one line and exit 2, no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "conntrack-gateway")],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("CONNTRACK_")},
            "CONNTRACK_GATEWAY_SPOOL_DIR": str(blocker / "spool"),
            "CONNTRACK_GATEWAY_LISTEN": "127.0.0.1:0",
            "CONNTRACK_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",  # never reached
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    assert done.stderr.strip().splitlines() == [
        f"conntrack-gateway: cannot use spool directory {blocker / 'spool'}: [Errno 20] Not a "
        f"directory: '{blocker / 'spool'}'; check CONNTRACK_GATEWAY_SPOOL_DIR"
    ]
    assert "Traceback" not in done.stderr
