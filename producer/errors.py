"""What the publisher raises. Every error names what happened and what to do about it."""

from __future__ import annotations


class PublisherError(Exception):
    """Base class of the publisher's own errors."""


class PublisherClosedError(PublisherError):
    """An event was handed to a publisher that is not started (or is stopping)."""


class BrokerUnavailableError(PublisherError):
    """The broker could not be reached, or did not take events, within the timeout."""


class TopicNotFoundError(PublisherError):
    """The events topic does not exist (provision it with `conntrack-producer topics`)."""


class DeliveryTimeoutError(PublisherError):
    """Events were handed to the producer but not acknowledged by the broker in time.

    They may still reach the broker later: republishing the same Event (same event_id) is safe,
    because the projector folds duplicates of one event into the same state.
    """


class UndeliveredEventsError(PublisherError):
    """flush() or stop() found events that could not be delivered since the previous check.

    Each of them has already been counted (Publisher.undelivered) and passed to the
    on_undeliverable callback; this error says how many, and the first cause.
    """

    def __init__(self, count: int, first_error: BaseException) -> None:
        super().__init__(
            f"{count} event(s) could not be delivered; first cause: "
            f"{type(first_error).__name__}: {first_error}"
        )
        self.count = count
        self.first_error = first_error


class SpoolError(PublisherError):
    """The spool cannot be used (its directory, a file in it)."""


class SpoolFullError(SpoolError):
    """An append would take the spool past its size bound (for the publisher: the broker is
    away and the spool holds spool_max_bytes already; the event was refused, not kept)."""
