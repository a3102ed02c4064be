"""One error type for the publisher: a bounded reason for scripts, a message for people.

The reasons are the one vocabulary of `wire.reasons` (the cloud-only ones in their own group);
`Reason` is re-exported here so the cloud side names one place for both.
"""

from __future__ import annotations

from wire.reasons import Reason, ReasonedError

__all__ = ["PublisherError", "Reason"]


class PublisherError(ReasonedError):
    """A command that cannot go on; ``message`` names exactly what was wrong."""
