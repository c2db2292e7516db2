"""The demo's WebSocket client (scripts/demo.sh): connects to the reference gateway, asks the API
about itself, has the API send it a message and then disconnect it, and shows each step.

    demo_client.py WS_URL

The API is called with `conntrack-api get / send / disconnect` (the venv's console scripts, next
to this interpreter), configured by the CONNTRACK_* variables the demo exports. Exits 0 when every
step happened as described, 1 otherwise."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from websockets.asyncio.client import connect

API = str(Path(sys.executable).parent / "conntrack-api")
WAIT_S = 30.0


async def api(*args: str) -> tuple[int, str, str]:
    """conntrack-api ARGS: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        API, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode().strip(), err.decode().strip()


async def get_until(cid: str, want: int) -> tuple[int, str, str]:
    """Get, again and again until it exits with `want` (0: found, 1: NOT_FOUND)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        code, out, err = await api("get", cid)
        if code == want or time.monotonic() > deadline:
            return code, out, err
        await asyncio.sleep(0.2)


def step(text: str) -> None:
    print(f"client: {text}", flush=True)


async def main(url: str) -> int:
    async with connect(url, user_agent_header="conntrack-demo-client/1.0") as ws:
        assert ws.response is not None
        cid = ws.response.headers["X-Connection-Id"]
        step(f"connected to {url}, my connection id is {cid}")

        code, out, err = await get_until(cid, 0)
        if code != 0:
            step(f"the API did not find me within {WAIT_S:.0f} s: {err}")
            return 1
        step(f"conntrack-api get {cid}:\n{out}")

        text = f"hello {cid[:8]}, sent through Kafka at {time.strftime('%H:%M:%S')}"
        step(f"conntrack-api send {cid} --text {text!r}")
        sending = asyncio.create_task(api("send", cid, "--text", text))
        try:
            received = await asyncio.wait_for(ws.recv(), WAIT_S)
        except TimeoutError:
            step(f"no message arrived within {WAIT_S:.0f} s")
            return 1
        step(f"received a message: {received!r}")
        code, _, err = await sending
        if code != 0:
            step(f"Send failed: {err}")
            return 1
        step("Send answered OK")

        step(f"conntrack-api disconnect {cid}")
        disconnecting = asyncio.create_task(api("disconnect", cid))
        try:
            await asyncio.wait_for(ws.wait_closed(), WAIT_S)
        except TimeoutError:
            step(f"the socket was not closed within {WAIT_S:.0f} s")
            return 1
        step(f"my socket closed: code {ws.close_code}, reason {ws.close_reason!r}")
        code, _, err = await disconnecting
        if code != 0:
            step(f"Disconnect failed: {err}")
            return 1
        step("Disconnect answered OK")

    code, out, err = await get_until(cid, 1)
    if code != 1:
        step(f"the API still finds the connection after {WAIT_S:.0f} s:\n{out}{err}")
        return 1
    step(f"conntrack-api get {cid} now answers {err}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(asyncio.run(main(sys.argv[1])))
