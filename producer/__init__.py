"""The gateway-side publisher of connection events, topic provisioning and a traffic simulator."""

from conntrack.producer.publisher import Publisher

__all__ = ["Publisher"]
