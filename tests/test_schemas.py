"""The schemas of the topics' records are a product other gateways and consumers build on
(buf.yaml): they pass `buf lint`, they have not broken the wire or JSON encoding since the last
release (`buf breaking` against proto/releases/), they name their Go and Java packages, and the
published descriptor set (proto/conntrack-topics.binpb) decodes the records as the service
writes them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

from conntrack.core.events import Connected, Event, encode
from tests.support.repo import REPO

BUF_HINT = "go install github.com/bufbuild/buf/cmd/buf@v1.75.0 (scripts/test.sh does)"
DESCRIPTORS = REPO / "proto" / "conntrack-topics.binpb"
RELEASES = REPO / "proto" / "releases"
TOPIC_PACKAGES = ("conntrack.events.v1", "conntrack.commands.v1", "conntrack.lifecycle.v1")


def _buf() -> str:
    exe = shutil.which("buf") or str(REPO / ".local" / "go" / "bin" / "buf")
    if not Path(exe).exists():
        reason = f"buf is not installed ({BUF_HINT})"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return exe


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_buf(), *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def last_release() -> Path:
    return max(RELEASES.glob("*.binpb"), key=lambda p: tuple(map(int, p.stem.split("."))))


def test_buf_lint_accepts_the_schemas() -> None:
    done = _run("lint")
    assert done.returncode == 0, done.stdout + done.stderr


def test_nothing_broke_since_the_last_release() -> None:
    done = _run("breaking", "--against", str(last_release()))
    assert done.returncode == 0, done.stdout + done.stderr


def _copy_with_events(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the schemas and buf.yaml, and its events.proto, for breaking it."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "proto", copy / "proto", ignore=shutil.ignore_patterns("*.binpb"))
    shutil.copy(REPO / "buf.yaml", copy / "buf.yaml")
    return copy, copy / "proto" / "conntrack" / "events" / "v1" / "events.proto"


def test_a_lint_violation_is_caught(tmp_path: Path) -> None:
    copy, events = _copy_with_events(tmp_path)
    text = events.read_text()
    assert "string gateway_id = 4;" in text
    events.write_text(text.replace("string gateway_id = 4;", "string gatewayId = 4;"))
    done = _run("lint", cwd=copy)
    assert done.returncode != 0
    assert "gatewayId" in done.stdout + done.stderr


def test_a_breaking_change_is_caught(tmp_path: Path) -> None:
    copy, events = _copy_with_events(tmp_path)
    text = events.read_text()
    assert "string connection_id = 3;" in text
    events.write_text(text.replace("string connection_id = 3;", "string connection_id = 99;"))
    done = _run("breaking", "--against", str(last_release()), cwd=copy)
    assert done.returncode != 0
    assert "connection_id" in done.stdout + done.stderr


def _descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTORS.read_bytes())


def test_every_topic_schema_names_its_go_and_java_packages() -> None:
    files = {f.package: f for f in _descriptor_set().file if f.package in TOPIC_PACKAGES}
    assert set(files) == set(TOPIC_PACKAGES)
    for package, file in files.items():
        version = package.split(".")[1]
        assert file.options.go_package.endswith(f"/{version}/v1;{version}v1"), package
        assert file.options.java_package.endswith(package.removeprefix("conntrack")), package
        assert file.options.java_multiple_files, package


def test_the_descriptor_set_alone_decodes_an_event_record() -> None:
    pool = descriptor_pool.DescriptorPool()
    for file in _descriptor_set().file:
        pool.Add(file)
    event_type = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("conntrack.events.v1.ConnectionEvent")
    )
    event = Event(
        event_id="e1",
        connection_id="c1",
        gateway_id="gw-1",
        occurred_at_ns=1_700_000_000_123_456_789,
        payload=Connected(source_ip="192.0.2.1", user_agent="ua", node_id="n1"),
    )
    # Made from the descriptors alone, the class is typed by nothing but them: read it as JSON.
    decoded = json_format.MessageToDict(event_type.FromString(encode(event)))
    assert (decoded["connectionId"], decoded["nodeId"]) == ("c1", "n1")
    assert decoded["connected"]["identity"]["sourceIp"] == "192.0.2.1"
