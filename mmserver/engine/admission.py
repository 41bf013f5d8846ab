"""Admission control: admit a waiting request only if the KV pool can hold every running
and admitted request at its peak, so no request is ever evicted for memory (DESIGN §6)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Footprint:
    held: int  # tokens it holds (or will hold once prefilled)
    growth: int  # tokens it may still add


def peak_tokens(footprints: list[Footprint]) -> int:
    """Largest KV use over time if everyone runs to its limit.

    Sorted by remaining growth, request i finishes after b_i more steps; at that moment
    requests 0..i are all alive and each has grown by b_i tokens.
    """
    peak = 0
    held = 0
    for i, f in enumerate(sorted(footprints, key=lambda f: f.growth, reverse=True)):
        held += f.held
        peak = max(peak, held + f.growth * (i + 1))
    return peak


def fits(running: list[Footprint], candidate: Footprint, capacity: int) -> bool:
    return peak_tokens(running + [candidate]) <= capacity
