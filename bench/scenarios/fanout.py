"""Figure 10: a Send addressed to people. Three reference gateway nodes (`conntrack-gateway`
subprocesses, the trusted-header identity on) hold N WebSocket clients between them (in client
processes of their own), every one labelled `tier=bench`; `conntrack-projector` puts them into the
read model and `conntrack-api serve` answers SendToConnections to the selector `tier=bench`: the
directory's pages, one command per node per 1,000 connections, each node's writes, the outcomes
back. Measured: the time from the call to its answer with the last target's outcome, three times
one after another; beside it, in the same run, the time a loop of single `Send`s (56 in flight,
the most sends/s of figure 6) takes to reach the same N connections."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from typing import Any

import asyncpg
import grpc

from bench.config import BenchConfig
from bench.infra import (
    asyncpg_dsn,
    fresh_database,
    fresh_topics,
    projector_settings,
    settings_environment,
    unique,
)
from bench.results import Figure, ScenarioResult, at_most
from bench.scenarios.freshness import wait_assigned
from bench.scenarios.send import (
    _api,
    _clients,
    _gateway,
    _wait_log,
    _wait_rows,
)
from bench.services import free_port, projector_service, running
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2 as pb
from conntrack.core.protogen.conntrack.directory.v1 import directory_pb2_grpc as pb_grpc
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2,
    connection_service_pb2_grpc,
)
from conntrack.producer.topics import TopicSpec, ensure_topics

NODES = 3
CONNECTIONS = 10_000
TIMES = 3
LOOP_CONCURRENCY = 56
TARGET_S = 2.0
IDENTITY = {
    "CONNTRACK_GATEWAY_AUTH": "header",
    "CONNTRACK_GATEWAY_LABELS": "tier=header:X-Tier",
}
HEADERS = {"X-Authenticated-User": "bench", "X-Tier": "bench"}
Send = connection_service_pb2.SendToConnectionRequest


def clients(cfg: BenchConfig) -> int:
    return max(NODES * 10, round(CONNECTIONS * min(cfg.scale, 1.0)))


async def _selector_send(stub: pb_grpc.ConnectionDirectoryServiceStub) -> tuple[float, Any]:
    request = pb.SendToConnectionsRequest(
        gateway_id="conntrack-gateway",
        targets=pb.Targets(filter=pb.ConnectionFilter(label_selector="tier=bench")),
        data=b"0 fan-out",
        type=pb.BroadcastRequest.TEXT,
    )
    started = time.perf_counter()
    answer = await stub.SendToConnections(request, timeout=60)
    return time.perf_counter() - started, answer


async def _directory_walk(stub: pb_grpc.ConnectionDirectoryServiceStub) -> tuple[float, int]:
    """The selector's targets read through ListConnections, 1,000 a page, as the API resolves
    them before it sends: the directory's share of a selector Send's time."""
    token, found = "", 0
    started = time.perf_counter()
    while True:
        page = await stub.ListConnections(
            pb.ListConnectionsRequest(
                gateway_id="conntrack-gateway",
                filter=pb.ConnectionFilter(label_selector="tier=bench"),
                page_size=1000,
                page_token=token,
            ),
            timeout=60,
        )
        found += len(page.connections)
        token = page.next_page_token
        if not token:
            return time.perf_counter() - started, found


async def _table_statistics(url: str) -> dict[str, Any]:
    """What PostgreSQL knows of the read model's tables when the figures were taken: plans
    depend on it (core/statistics.py)."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await conn.fetch(
            "SELECT relname, n_live_tup, n_dead_tup, last_analyze, last_autoanalyze "
            "FROM pg_stat_user_tables WHERE relname IN ('connections', 'connection_labels')"
        )
    finally:
        await conn.close()
    return {
        r["relname"]: {
            "live": r["n_live_tup"],
            "dead": r["n_dead_tup"],
            "analyzed": str(r["last_analyze"] or ""),
            "autoanalyzed": str(r["last_autoanalyze"] or ""),
        }
        for r in rows
    }


async def _single_sends(
    stub: connection_service_pb2_grpc.ConnectionServiceStub, ids: list[str]
) -> tuple[float, int]:
    """Every id once, LOOP_CONCURRENCY Sends in flight; the time taken and the errors."""
    queue = iter(ids)
    errors = 0

    async def caller() -> None:
        nonlocal errors
        for cid in queue:
            try:
                await stub.Send(Send(connection_id=cid, data=b"0 loop", type=Send.TEXT), timeout=30)
            except grpc.aio.AioRpcError:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(LOOP_CONCURRENCY)))
    return time.perf_counter() - started, errors


async def run(cfg: BenchConfig, result: ScenarioResult) -> None:
    n = clients(cfg)
    result.params.update(nodes=NODES, connections=n, times=TIMES, loop_concurrency=LOOP_CONCURRENCY)
    log_dir = cfg.work_dir / "logs"
    ctx = multiprocessing.get_context("spawn")
    commands, outcomes = unique("commands"), unique("outcomes")
    await ensure_topics(
        cfg.kafka,
        [
            TopicSpec(commands, cfg.partitions, 1, 1, retention_ms=3_600_000),
            TopicSpec(outcomes, cfg.partitions, 1, 1, retention_ms=3_600_000),
        ],
    )
    async with fresh_topics(cfg, "fanout") as (topic, dlq), fresh_database(cfg, "fanout") as url:
        settings = projector_settings(cfg, topic, dlq, url)
        target = f"127.0.0.1:{free_port()}"
        projector = projector_service(settings_environment(settings), log_dir)
        gateways = [
            _gateway(cfg, topic, commands, outcomes, log_dir, IDENTITY) for _ in range(NODES)
        ]
        api = _api(cfg, url, target, commands, outcomes, log_dir)
        async with (
            running(projector),
            running(gateways[0]),
            running(gateways[1]),
            running(gateways[2]),
            running(api),
        ):
            urls = [(await _wait_log(g, "listening on ws://")).split()[2] for g in gateways]
            await wait_assigned(url, topic, cfg.partitions, projector)
            stop = ctx.Event()
            holders = []
            ids: list[str] = []
            for i, ws_url in enumerate(urls):
                share = n // NODES + (1 if i < n % NODES else 0)
                ids_q, out = ctx.Queue(), ctx.Queue()
                holder = ctx.Process(
                    target=_clients, args=(ws_url, share, ids_q, stop, out, HEADERS)
                )
                holder.start()
                holders.append(holder)
                ids += await asyncio.to_thread(ids_q.get, True, 300)
            try:
                await _wait_rows(url, n, within_s=300)
                async with grpc.aio.insecure_channel(target) as channel:
                    directory = pb_grpc.ConnectionDirectoryServiceStub(channel)
                    single = connection_service_pb2_grpc.ConnectionServiceStub(channel)
                    # Until the API's command channel answers (it connects in the background).
                    for _ in range(300):
                        _, answer = await _selector_send(directory)
                        if answer.done == n:
                            break
                        await asyncio.sleep(0.2)
                    times, answers = [], []
                    for _ in range(TIMES):
                        took, answer = await _selector_send(directory)
                        times.append(took)
                        answers.append(
                            {
                                "done": answer.done,
                                "gone": answer.gone,
                                "node_unreachable": answer.node_unreachable,
                            }
                        )
                    walks = [await _directory_walk(directory) for _ in range(TIMES)]
                    statistics = await _table_statistics(url)
                    loop_s, loop_errors = await _single_sends(single, ids)
            finally:
                stop.set()
                for holder in holders:
                    holder.join(timeout=30)
                    if holder.is_alive():
                        holder.kill()
            result.params.update(
                answers=answers,
                times_s=[round(t, 3) for t in times],
                directory_walks_s=[round(t, 3) for t, _ in walks],
                table_statistics=statistics,
                loop_errors=loop_errors,
                gateway_peak_rss_mb=[g.peak_rss_mb() for g in gateways],
                api_peak_rss_mb=api.peak_rss_mb(),
            )
    if any(a["done"] != n for a in answers):
        raise RuntimeError(f"a selector Send did not reach every target: {answers}")
    ordered = sorted(times)
    median = ordered[len(ordered) // 2]
    label = f"selector Send to {n:,} connections on {NODES} nodes: call to last outcome"
    result.add(
        Figure(
            "selector_send_median_s",
            f"{label}, median of {TIMES}",
            median,
            "s",
            ceiling=loop_s,
            ceiling_label=f"a loop of {n:,} single Sends, {LOOP_CONCURRENCY} in flight",
        )
    )
    result.add(Figure("selector_send_max_s", f"{label}, slowest of {TIMES}", ordered[-1], "s"))
    walk = sorted(t for t, _ in walks)[len(walks) // 2]
    result.add(
        Figure(
            "selector_targets_walk_median_s",
            f"beside it: the {n:,} targets listed through ListConnections, 1,000 a page, median",
            walk,
            "s",
        )
    )
    check = at_most(
        ordered[-1], TARGET_S, f"selector Send to 10,000 on 3 nodes <= {TARGET_S:g} s", " s"
    )
    if n < CONNECTIONS:
        check.met = None
    result.targets.append(check)
