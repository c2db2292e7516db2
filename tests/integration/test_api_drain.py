"""A drain ends near its grace whatever the database does: with the read model's table locked by
another session, Gets wait on the lock; on SIGTERM `conntrack-api serve` cuts them at the grace
and exits within a second of it, cleanly, instead of waiting for the database."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import asyncpg
import grpc
import pytest

from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2 as svc,
)
from conntrack.core.protogen.yandex.cloud.serverless.apigateway.websocket.v1 import (
    connection_service_pb2_grpc as svc_grpc,
)
from tests.support.ports import free_port

pytestmark = [pytest.mark.postgres]

API = Path(sys.executable).parent / "conntrack-api"
GRACE_S = 2.0


@pytest.mark.parametrize("backend", ["postgres"])
async def test_sigterm_while_the_database_hangs_exits_within_the_grace(
    database_url: str, tmp_path: Path
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    log = tmp_path / "api.log"
    env = {
        **os.environ,
        "CONNTRACK_DATABASE_URL": database_url,
        "CONNTRACK_API_LISTEN": listen,
        "CONNTRACK_API_WORKERS": "1",
        "CONNTRACK_API_GRACE_SECONDS": str(GRACE_S),
        "CONNTRACK_API_DB_TIMEOUT_SECONDS": "30",  # the database would hold them this long
    }
    holder = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    with log.open("wb") as out:
        api = await asyncio.create_subprocess_exec(
            str(API), "serve", env=env, stdout=out, stderr=out
        )
        try:
            async with grpc.aio.insecure_channel(listen) as channel:
                stub = svc_grpc.ConnectionServiceStub(channel)
                await channel_ready(channel)
                lock = holder.transaction()
                await lock.start()
                await holder.execute("LOCK TABLE connections IN ACCESS EXCLUSIVE MODE")
                calls = [
                    asyncio.ensure_future(
                        stub.Get(svc.GetConnectionRequest(connection_id=f"c{i}"), timeout=60)
                    )
                    for i in range(8)
                ]
                await asyncio.sleep(1.0)  # the lookups are waiting on the lock
                assert not any(call.done() for call in calls)
                started = time.monotonic()
                api.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(api.wait(), 30)
                took = time.monotonic() - started
                for call in calls:
                    with pytest.raises(grpc.aio.AioRpcError) as cut:
                        await call
                    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
                await lock.rollback()
        finally:
            if api.returncode is None:
                api.kill()
            await holder.close()
    output = log.read_text(errors="replace")
    assert code == 0, output
    assert took < GRACE_S + 1, (took, output)
    assert " ERROR " not in output, output
    assert "Traceback" not in output, output


async def channel_ready(channel: grpc.aio.Channel) -> None:
    for _ in range(300):
        try:
            await asyncio.wait_for(channel.channel_ready(), 0.5)
            return
        except TimeoutError:
            continue
    raise AssertionError("the API did not start listening")
