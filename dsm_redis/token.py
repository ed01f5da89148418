"""The fencing token as a value: what the database judges (``fence.py``), whoever holds it.

A ``Token`` names one lease's claim on one object: the object's key, the number Redis minted for
the lease (strictly increasing per object across leases) and the lease's owner id. It is immutable:
a lease whose counter is re-anchored gets a new ``Token`` and adopts it (``lifecycle.Lease``); the
fence never changes one in place.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Token"]


@dataclass(frozen=True)
class Token:
    """``number`` minted by Redis for the lease ``owner`` holds on the object ``key``."""

    key: str
    number: int
    owner: str

    def renumbered(self, number: int) -> Token:
        """The same lease's claim under a newly minted ``number`` (a re-anchored counter)."""
        return Token(self.key, number, self.owner)
