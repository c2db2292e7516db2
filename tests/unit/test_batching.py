"""The coalescing loader (api/read/batching.py) against a scripted fetch: exact behaviour, then a
property over arbitrary interleavings of lookups, cancellations, answers and failures."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conntrack.api.read.batching import CoalescingLoader, LoaderStats

Answer = tuple[str, int]  # (key, id of the query that answered it)


class QueryFailed(Exception):
    def __init__(self, query_id: int) -> None:
        super().__init__(f"query {query_id} failed")
        self.query_id = query_id


@dataclass
class Query:
    id: int
    keys: list[str]
    started_at: int
    outcome: asyncio.Future[QueryFailed | None]
    cancelled: bool = False


@dataclass
class ScriptedDatabase:
    """Each fetch is a query the test answers (or fails) when it chooses."""

    present: frozenset[str]
    clock: itertools.count[int] = field(default_factory=itertools.count)
    queries: list[Query] = field(default_factory=list)
    max_open: int = 0

    @property
    def open(self) -> list[Query]:
        return [q for q in self.queries if not q.outcome.done()]

    async def fetch(self, keys: Sequence[str]) -> dict[str, Answer]:
        query = Query(
            len(self.queries),
            list(keys),
            next(self.clock),
            asyncio.get_running_loop().create_future(),
        )
        self.queries.append(query)
        self.max_open = max(self.max_open, len(self.open))
        try:
            failure = await query.outcome
        except asyncio.CancelledError:
            query.cancelled = True
            raise
        if failure is not None:
            raise failure
        return {key: (key, query.id) for key in keys if key in self.present}

    def answer(self, query: Query) -> None:
        query.outcome.set_result(None)

    def fail(self, query: Query) -> None:
        query.outcome.set_result(QueryFailed(query.id))


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def loader_for(
    db: ScriptedDatabase, *, max_keys: int = 256, max_in_flight: int = 1, window: float = 0.0
) -> CoalescingLoader[str, Answer]:
    return CoalescingLoader(db.fetch, max_keys=max_keys, max_in_flight=max_in_flight, window=window)


async def eventually(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.005)


async def test_a_lone_lookup_is_sent_on_the_next_turn() -> None:
    db = ScriptedDatabase(frozenset({"a"}))
    loader = loader_for(db)
    call = asyncio.ensure_future(loader.load("a"))
    await turns(3)
    [query] = db.queries
    assert query.keys == ["a"]
    db.answer(query)
    assert await call == ("a", 0)
    stats = loader.stats()
    assert (stats.queries, stats.keys, stats.in_flight, stats.waiting) == (1, 1, 0, 0)


async def test_lookups_of_one_turn_share_a_query_and_duplicates_are_asked_once() -> None:
    db = ScriptedDatabase(frozenset({"a", "b"}))
    loader = loader_for(db)
    calls = [asyncio.ensure_future(loader.load(k)) for k in ("a", "b", "a", "missing", "b")]
    await turns()
    [query] = db.queries
    assert query.keys == ["a", "b", "missing"]
    db.answer(query)
    assert await asyncio.gather(*calls) == [("a", 0), ("b", 0), ("a", 0), None, ("b", 0)]
    assert loader.stats().keys == 3


async def test_lookups_during_a_query_wait_and_go_together_right_after_it() -> None:
    db = ScriptedDatabase(frozenset("abcd"))
    loader = loader_for(db)
    first = asyncio.ensure_future(loader.load("a"))
    await turns()
    later = [asyncio.ensure_future(loader.load(k)) for k in "bcd"]
    await turns()
    assert len(db.queries) == 1  # the others wait for the query in flight
    assert loader.stats().waiting == 3
    db.answer(db.queries[0])
    assert await first == ("a", 0)
    await turns()
    assert [q.keys for q in db.queries] == [["a"], ["b", "c", "d"]]
    db.answer(db.queries[1])
    assert await asyncio.gather(*later) == [("b", 1), ("c", 1), ("d", 1)]


async def test_a_key_being_queried_is_asked_again_for_a_later_caller() -> None:
    """A caller never gets an answer read before it asked."""
    db = ScriptedDatabase(frozenset("a"))
    loader = loader_for(db)
    early = asyncio.ensure_future(loader.load("a"))
    await turns()
    late = asyncio.ensure_future(loader.load("a"))
    await turns()
    db.answer(db.queries[0])
    await turns()
    db.answer(db.queries[1])
    assert (await early, await late) == (("a", 0), ("a", 1))


async def test_batches_hold_at_most_max_keys_distinct_keys() -> None:
    db = ScriptedDatabase(frozenset(str(i) for i in range(10)))
    loader = loader_for(db, max_keys=4)
    calls = [asyncio.ensure_future(loader.load(str(i % 10))) for i in range(25)]
    for _ in range(10):
        await turns()
        for query in db.open:
            db.answer(query)
    results = await asyncio.gather(*calls)
    assert [r[0] if r else None for r in results] == [str(i % 10) for i in range(25)]
    assert all(len(q.keys) <= 4 and len(set(q.keys)) == len(q.keys) for q in db.queries)
    assert len(db.queries) == 3  # 10 distinct keys, asked once each while all were queued


async def test_max_in_flight_queries_run_at_once() -> None:
    db = ScriptedDatabase(frozenset("abc"))
    loader = loader_for(db, max_keys=1, max_in_flight=2)
    calls = [asyncio.ensure_future(loader.load(k)) for k in "abc"]
    await turns()
    assert [q.keys for q in db.open] == [["a"], ["b"]]
    db.answer(db.queries[1])
    await turns()
    assert [q.keys for q in db.open] == [["a"], ["c"]]
    for query in db.open:
        db.answer(query)
    assert await asyncio.gather(*calls) == [("a", 0), ("b", 1), ("c", 2)]


async def test_a_failed_query_fails_its_callers_only() -> None:
    db = ScriptedDatabase(frozenset("abc"))
    loader = loader_for(db)
    first = [asyncio.ensure_future(loader.load(k)) for k in "ab"]
    await turns()
    second = asyncio.ensure_future(loader.load("c"))
    await turns()
    db.fail(db.queries[0])
    for call in first:
        with pytest.raises(QueryFailed):
            await call
    await turns()
    db.answer(db.queries[1])
    assert await second == ("c", 1)


async def test_a_cancelled_caller_leaves_the_query_to_the_others() -> None:
    db = ScriptedDatabase(frozenset("ab"))
    loader = loader_for(db)
    leaving, staying = (
        asyncio.ensure_future(loader.load("a")),
        asyncio.ensure_future(loader.load("a")),
    )
    other = asyncio.ensure_future(loader.load("b"))
    await turns()
    leaving.cancel()
    await turns()
    assert leaving.cancelled()
    assert not db.queries[0].cancelled
    db.answer(db.queries[0])
    assert (await staying, await other) == (("a", 0), ("b", 0))


async def test_the_query_is_cancelled_when_every_caller_left() -> None:
    db = ScriptedDatabase(frozenset("ab"))
    loader = loader_for(db)
    calls = [asyncio.ensure_future(loader.load(k)) for k in "ab"]
    await turns()
    for call in calls:
        call.cancel()
    await turns()
    assert db.queries[0].cancelled
    assert loader.stats().in_flight == 0
    # The slot is free again.
    again = asyncio.ensure_future(loader.load("a"))
    await turns()
    db.answer(db.queries[1])
    assert await again == ("a", 1)


async def test_callers_that_leave_while_queued_are_not_asked_for() -> None:
    db = ScriptedDatabase(frozenset("abc"))
    loader = loader_for(db)
    first = asyncio.ensure_future(loader.load("a"))
    await turns()
    gone = asyncio.ensure_future(loader.load("b"))
    kept = asyncio.ensure_future(loader.load("c"))
    await turns()
    gone.cancel()
    await turns()
    assert loader.stats().waiting == 1
    db.answer(db.queries[0])
    await turns()
    assert db.queries[1].keys == ["c"]
    db.answer(db.queries[1])
    assert (await first, await kept) == (("a", 0), ("c", 1))
    # A queued batch whose callers all left never runs.
    blocker = asyncio.ensure_future(loader.load("a"))
    await turns()
    abandoned = asyncio.ensure_future(loader.load("b"))
    await turns()
    abandoned.cancel()
    await turns()
    db.answer(db.queries[2])
    await blocker
    await turns()
    assert len(db.queries) == 3
    assert loader.stats().waiting == 0


async def test_callers_leaving_before_their_query_took_its_first_step() -> None:
    """The query's task is cancelled before it ever ran: its slot must still come back."""
    db = ScriptedDatabase(frozenset("a"))
    loader = loader_for(db)
    call = asyncio.ensure_future(loader.load("a"))
    await asyncio.sleep(0)  # queued, and the launch is scheduled
    call.cancel()  # handled after the launch made the query's task, before that task runs
    await turns()
    assert call.cancelled()
    assert not db.queries
    assert loader.stats().in_flight == 0
    again = asyncio.ensure_future(loader.load("a"))
    await turns()
    db.answer(db.queries[0])
    assert await again == ("a", 0)


async def test_wait_idle_returns_once_no_query_runs() -> None:
    db = ScriptedDatabase(frozenset("a"))
    loader = loader_for(db)
    call = asyncio.ensure_future(loader.load("a"))
    await turns()
    idle = asyncio.ensure_future(loader.wait_idle())
    await turns()
    assert not idle.done()
    db.answer(db.queries[0])
    await idle
    assert await call == ("a", 0)


def test_limits_must_be_positive() -> None:
    db = ScriptedDatabase(frozenset())
    with pytest.raises(ValueError, match="at least 1"):
        loader_for(db, max_keys=0)
    with pytest.raises(ValueError, match="at least 1"):
        loader_for(db, max_in_flight=0)
    with pytest.raises(ValueError, match="at least 0"):
        loader_for(db, window=-0.001)
    with pytest.raises(ValueError, match="at least 0"):
        loader_for(db, window=float("nan"))


# --- the batching window ------------------------------------------------------------------------
# A window of an hour stands for "never within this test": nothing here waits for it to end.

HOUR = 3600.0


async def a_shared_query_answered(
    db: ScriptedDatabase, loader: CoalescingLoader[str, Answer]
) -> None:
    """Puts the loader under load: one query that two callers shared, answered."""
    calls = [asyncio.ensure_future(loader.load(k)) for k in "ab"]
    await turns()
    db.answer(db.queries[-1])
    await asyncio.gather(*calls)


async def test_an_idle_loader_sends_a_lookup_on_the_next_turn_whatever_the_window() -> None:
    db = ScriptedDatabase(frozenset("abcd"))
    loader = loader_for(db, window=HOUR)
    call = asyncio.ensure_future(loader.load("a"))
    await turns(3)
    assert [q.keys for q in db.queries] == [["a"]]
    db.answer(db.queries[0])
    assert await call == ("a", 0)


async def test_one_get_after_another_never_waits_for_the_window() -> None:
    """A client calling alone, each Get after the previous answer: nobody could share its
    query, so the window would only add latency."""
    db = ScriptedDatabase(frozenset("abcd"))
    loader = loader_for(db, window=HOUR)
    for i, key in enumerate("abcd"):
        call = asyncio.ensure_future(loader.load(key))
        await turns(3)
        assert len(db.queries) == i + 1
        db.answer(db.queries[i])
        assert await call == (key, i)


async def test_under_load_lookups_wait_for_the_window_and_go_together() -> None:
    window = 0.5
    db = ScriptedDatabase(frozenset("abcdef"))
    loader = loader_for(db, window=window)
    loop = asyncio.get_running_loop()
    before_first = loop.time()
    await a_shared_query_answered(db, loader)
    # Even alone in the loader, a caller right after a shared query waits: under load the
    # loader is often empty for a moment, and batches would stop forming.
    later = [asyncio.ensure_future(loader.load("c"))]
    await turns()
    later += [asyncio.ensure_future(loader.load(k)) for k in "dc"]
    await turns()
    assert len(db.queries) == 1
    assert loader.stats().waiting == 3
    await eventually(lambda: len(db.queries) == 2)
    assert loop.time() - before_first >= window
    assert db.queries[1].keys == ["c", "d"]
    db.answer(db.queries[1])
    assert await asyncio.gather(*later) == [("c", 1), ("d", 1), ("c", 1)]


async def test_a_full_batch_does_not_wait_for_the_window() -> None:
    db = ScriptedDatabase(frozenset("abcdef"))
    loader = loader_for(db, max_keys=2, window=HOUR)
    await a_shared_query_answered(db, loader)
    waiting = asyncio.ensure_future(loader.load("c"))
    await turns()
    assert len(db.queries) == 1
    full = [asyncio.ensure_future(loader.load("d"))]
    await turns()
    assert [q.keys for q in db.queries] == [["a", "b"], ["c", "d"]]
    # The next one waits again: the full batch did not end the window.
    full.append(asyncio.ensure_future(loader.load("e")))
    await turns()
    assert len(db.queries) == 2
    db.answer(db.queries[1])
    assert (await waiting, await full[0]) == (("c", 1), ("d", 1))
    full[1].cancel()
    await turns()
    assert loader.stats().waiting == 0


async def test_lookups_queued_behind_a_quick_query_wait_for_the_rest_of_the_window() -> None:
    db = ScriptedDatabase(frozenset("abcdef"))
    loader = loader_for(db, window=HOUR)
    shared = [asyncio.ensure_future(loader.load(k)) for k in "ab"]
    await turns()
    queued = [asyncio.ensure_future(loader.load(k)) for k in "cd"]
    await turns()
    db.answer(db.queries[0])
    await asyncio.gather(*shared)
    await turns()
    assert len(db.queries) == 1  # the query took less than the window: the rest is waited
    assert loader.stats().waiting == 2
    for call in queued:
        call.cancel()
    await turns()
    assert loader.stats() == LoaderStats(queries=1, keys=2, in_flight=0, waiting=0)


async def test_a_window_of_zero_is_the_plain_loader() -> None:
    db = ScriptedDatabase(frozenset("abcd"))
    loader = loader_for(db, window=0.0)
    await a_shared_query_answered(db, loader)
    call = asyncio.ensure_future(loader.load("c"))
    await turns(3)
    assert len(db.queries) == 2
    db.answer(db.queries[1])
    assert await call == ("c", 1)


# --- any interleaving ---------------------------------------------------------------------------

KEYS = ("a", "b", "c", "d", "e")
PRESENT = frozenset({"a", "b", "c"})

operation = st.one_of(
    st.tuples(st.just("lookup"), st.sampled_from(KEYS)),
    st.tuples(st.just("cancel"), st.integers(0, 40)),
    st.tuples(st.just("turn"), st.integers(1, 3)),
    st.tuples(st.just("answer"), st.integers(0, 5)),
    st.tuples(st.just("fail"), st.integers(0, 5)),
)


@dataclass
class Caller:
    key: str
    asked_at: int = -1  # stays -1 for a caller cancelled before it ran
    cancel_requested: bool = False
    task: asyncio.Task[Answer | None] | None = None

    @property
    def running(self) -> asyncio.Task[Answer | None]:
        assert self.task is not None
        return self.task


async def interleave(
    ops: list[tuple[str, object]], max_keys: int, max_in_flight: int, window: float
) -> tuple[ScriptedDatabase, list[Caller]]:
    db = ScriptedDatabase(PRESENT)
    loader = loader_for(db, max_keys=max_keys, max_in_flight=max_in_flight, window=window)
    callers: list[Caller] = []

    async def ask(caller: Caller) -> Answer | None:
        caller.asked_at = next(db.clock)
        return await loader.load(caller.key)

    def start(key: str) -> None:
        caller = Caller(key)
        caller.task = asyncio.get_running_loop().create_task(ask(caller))
        callers.append(caller)

    for kind, arg in ops:
        if kind == "lookup":
            assert isinstance(arg, str)
            start(arg)
        elif kind == "cancel" and callers:
            assert isinstance(arg, int)
            caller = callers[arg % len(callers)]
            caller.cancel_requested |= caller.running.cancel()
        elif kind == "turn":
            assert isinstance(arg, int)
            await turns(arg)
        elif kind in ("answer", "fail") and db.open:
            assert isinstance(arg, int)
            query = db.open[arg % len(db.open)]
            db.answer(query) if kind == "answer" else db.fail(query)
    # Then the database answers everything until every caller is done.
    for _ in range(1000):
        await turns()
        if window:
            await asyncio.sleep(window)  # batches held back by the window start meanwhile
        for query in db.open:
            db.answer(query)
        if all(c.running.done() for c in callers):
            break
    else:
        pytest.fail("callers still waiting after every query was answered")
    stats = loader.stats()
    assert (stats.in_flight, stats.waiting) == (0, 0)
    return db, callers


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(operation, max_size=60),
    max_keys=st.integers(1, 4),
    max_in_flight=st.integers(1, 3),
    window=st.sampled_from([0.0, 0.0005]),
)
def test_every_caller_gets_exactly_its_own_answer_or_error(
    ops: list[tuple[str, object]], max_keys: int, max_in_flight: int, window: float
) -> None:
    db, callers = asyncio.run(interleave(ops, max_keys, max_in_flight, window))
    assert db.max_open <= max_in_flight
    for query in db.queries:
        assert 1 <= len(query.keys) <= max_keys
        assert len(set(query.keys)) == len(query.keys)
    for caller in callers:
        task = caller.running
        if caller.cancel_requested:
            assert task.cancelled()
            continue
        # Nobody else's cancellation reaches a caller that stayed.
        assert not task.cancelled(), caller
        error = task.exception()
        if error is not None:
            assert isinstance(error, QueryFailed)
            query = db.queries[error.query_id]
        else:
            answer = task.result()
            if answer is None:
                assert caller.key not in PRESENT
                continue
            key, query_id = answer
            assert key == caller.key
            query = db.queries[query_id]
        # Its own key, from a query that started after it asked and was not cancelled (a query
        # cancelled under a caller that stayed would have left it cancelled, checked above).
        assert caller.key in query.keys
        assert query.started_at > caller.asked_at
        assert not query.cancelled
