"""The reference gateway: a WebSocket server that takes the node role, publishes its
connections' events and executes the API's Send and Disconnect (docs/gateway.md)."""

from conntrack.gateway.server import Gateway

__all__ = ["Gateway"]
