"""The pure parts of `conntrack-api serve`'s workers (api/process/workers.py): how many workers, the
restart backoff, and how the supervisor holds the port (loopback sockets only)."""

from __future__ import annotations

import json
import logging
import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conntrack.api.process.cores import cgroup_cpu_limit, cores_from, resolve_workers
from conntrack.api.process.workers import RestartBackoff, hold_port
from conntrack.core import cli
from conntrack.core.process import setup_logging
from conntrack.core.settings import Settings


def test_cgroup_cpu_max_lines() -> None:
    assert cgroup_cpu_limit("max 100000\n") is None
    assert cgroup_cpu_limit("200000 100000\n") == 2
    assert cgroup_cpu_limit("150000 100000") == 2  # 1.5 cores: a second worker still helps
    assert cgroup_cpu_limit("50000 100000") == 1
    assert cgroup_cpu_limit(None) is None
    assert cgroup_cpu_limit("") is None
    assert cgroup_cpu_limit("garbage") is None
    assert cgroup_cpu_limit("x 100000") is None
    assert cgroup_cpu_limit("0 100000") is None


def test_cores_are_the_affinity_capped_by_the_cgroup_quota() -> None:
    assert cores_from(16, "200000 100000") == 2
    assert cores_from(2, "800000 100000") == 2
    assert cores_from(4, "max 100000") == 4
    assert cores_from(4, None) == 4
    assert cores_from(0, None) == 1


def test_worker_count_follows_the_setting_or_the_cores() -> None:
    assert Settings().api_workers is None  # the default: one per core
    assert resolve_workers(None, "127.0.0.1:50051", 8) == 8
    assert resolve_workers(None, "127.0.0.1:50051", 0) == 1
    assert resolve_workers(1, "127.0.0.1:50051", 8) == 1
    assert resolve_workers(3, "[::]:50051", 2) == 3  # asked for: more than the cores is allowed
    assert resolve_workers(None, "unix:/run/api.sock", 8) == 1
    assert resolve_workers(1, "unix:/run/api.sock", 8) == 1


def test_a_unix_socket_cannot_have_several_workers() -> None:
    with pytest.raises(cli.CommandError) as raised:
        resolve_workers(4, "unix:/run/api.sock", 8)
    assert raised.value.code == cli.Exit.USAGE
    assert "CONNTRACK_API_WORKERS" in str(raised.value)
    assert "Unix socket" in str(raised.value)


def test_settings_refuse_zero_workers() -> None:
    with pytest.raises(ValueError, match="api_workers"):
        Settings(api_workers=0)


def test_backoff_doubles_while_workers_die_young_and_resets_after_a_stable_run() -> None:
    backoff = RestartBackoff(initial=0.5, ceiling=4.0, stable_seconds=30.0)
    assert [backoff.delay(0.1) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.delay(31.0) == 0.5  # it had lived long enough: a fresh start
    assert backoff.delay(1.0) == 1.0


@given(st.lists(st.floats(min_value=0, max_value=120), min_size=1, max_size=40))
def test_backoff_stays_within_its_bounds(lifetimes: list[float]) -> None:
    backoff = RestartBackoff(initial=0.25, ceiling=10.0, stable_seconds=5.0)
    previous = 0.0
    for lived in lifetimes:
        pause = backoff.delay(lived)
        assert 0.25 <= pause <= 10.0
        if lived >= 5.0:
            assert pause == 0.25
        elif previous:
            assert pause == min(10.0, previous * 2)
        previous = pause


def test_hold_port_resolves_port_zero_and_lets_reuseport_sockets_join() -> None:
    held, listen = hold_port("127.0.0.1:0")
    try:
        host, _, port = listen.rpartition(":")
        assert host == "127.0.0.1"
        assert int(port) > 0
        worker = socket.socket()
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        worker.bind(("127.0.0.1", int(port)))  # a worker joins the group
        worker.listen()
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
            pass  # and takes the connections: the held socket does not listen
        worker.close()
        plain = socket.socket()
        with pytest.raises(OSError, match="in use"):  # no SO_REUSEPORT: still kept out
            plain.bind(("127.0.0.1", int(port)))
        plain.close()
    finally:
        for sock in held:
            sock.close()


@pytest.mark.parametrize("reuseport", [False, True])
def test_hold_port_refuses_a_port_held_by_another_server(reuseport: bool) -> None:
    with socket.socket() as other:
        if reuseport:  # as a grpc server with its defaults binds on Linux
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        busy = f"127.0.0.1:{other.getsockname()[1]}"
        with pytest.raises(OSError, match=f"cannot listen on {busy}"):
            hold_port(busy)


def test_hold_port_refuses_what_is_not_host_port() -> None:
    with pytest.raises(OSError, match="not host:port"):
        hold_port("127.0.0.1")
    with pytest.raises(OSError, match="not host:port"):
        hold_port("127.0.0.1:http")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_workers_log_lines_say_which_worker(
    log_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    setup_logging("INFO", log_format, worker=3)
    try:
        logging.getLogger("conntrack.api").info("event=probe state=%s", "SERVING")
    finally:  # pytest's own handlers back, as they were
        root.handlers[:] = handlers
        root.setLevel(level)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    if log_format == "text":
        tag = f"[worker 3 pid {os.getpid()}]"
        assert line.endswith(f"INFO conntrack.api: {tag} event=probe state=SERVING")
    else:
        fields = json.loads(line)
        assert fields["worker"] == 3
        assert fields["pid"] == os.getpid()
        assert fields["message"] == "event=probe state=SERVING"
        assert fields["state"] == "SERVING"
