"""The one base of every strict wire type: unknown fields refused, values frozen, no coercion.

A document that crosses a process or the network is parsed into one of these at the boundary and
acted on as a typed value; what it does not declare is an error that names the field, never a
silently ignored key.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class WireModel(BaseModel):
    """Strict and frozen: a wire document is a value, parsed once and never edited in place."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class LaxWireModel(BaseModel):
    """Frozen and closed, but with JSON's lax coercions (an ISO string into a datetime).

    For documents read back from JSON text, where strict mode would refuse a `datetime` or a
    `tuple` that JSON can only spell as a string or a list.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
