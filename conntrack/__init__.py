"""ws-connection-tracker: an event-sourced connection tracker for WebSocket API gateways.

The one import package of the project. Its subpackages are the repository's top-level folders:

- ``conntrack.core``: settings, the event schema and codec, the pure fold, the read-model schema;
- ``conntrack.producer``: the gateway side (``Publisher``, ``NodeCommands``, topics, simulator);
- ``conntrack.projector``: folds the event log into the SQL read model;
- ``conntrack.api``: the gRPC ``ConnectionService`` and its REST mapping;
- ``conntrack.audit``: replay and verification of history;
- ``conntrack.gateway``: the reference WebSocket gateway;
- ``conntrack.migrations``: Alembic migrations of the read model.

What a gateway of another make needs is importable from here::

    from conntrack import Publisher, NodeCommands, Connected, Activity, Disconnected

These names are the library's public API; everything else may change between releases. They
are loaded on first use, so ``import conntrack.core.events`` does not import the Kafka client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conntrack.core.events import (
        Activity,
        Cause,
        Connected,
        Disconnected,
        Event,
        InvalidEvent,
        NodeHeartbeat,
        NodeStarted,
    )
    from conntrack.producer.command_execution import CommandHandler, FenceHandler
    from conntrack.producer.commands import NodeCommands
    from conntrack.producer.errors import (
        BrokerUnavailableError,
        DeliveryTimeoutError,
        PublisherClosedError,
        PublisherError,
        TopicNotFoundError,
        UndeliveredEventsError,
    )
    from conntrack.producer.publisher import Publisher

__all__ = [
    "Activity",
    "BrokerUnavailableError",
    "Cause",
    "CommandHandler",
    "Connected",
    "DeliveryTimeoutError",
    "Disconnected",
    "Event",
    "FenceHandler",
    "InvalidEvent",
    "NodeCommands",
    "NodeHeartbeat",
    "NodeStarted",
    "Publisher",
    "PublisherClosedError",
    "PublisherError",
    "TopicNotFoundError",
    "UndeliveredEventsError",
]

_ERRORS = "conntrack.producer.errors"
_HOMES = {
    "Activity": "conntrack.core.events",
    "BrokerUnavailableError": _ERRORS,
    "Cause": "conntrack.core.events",
    "DeliveryTimeoutError": _ERRORS,
    "CommandHandler": "conntrack.producer.command_execution",
    "Connected": "conntrack.core.events",
    "Disconnected": "conntrack.core.events",
    "Event": "conntrack.core.events",
    "FenceHandler": "conntrack.producer.command_execution",
    "InvalidEvent": "conntrack.core.events",
    "NodeCommands": "conntrack.producer.commands",
    "NodeHeartbeat": "conntrack.core.events",
    "NodeStarted": "conntrack.core.events",
    "Publisher": "conntrack.producer.publisher",
    "PublisherClosedError": _ERRORS,
    "PublisherError": _ERRORS,
    "TopicNotFoundError": _ERRORS,
    "UndeliveredEventsError": _ERRORS,
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'conntrack' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
