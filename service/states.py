"""Experiment states and the transitions between them (issue item 3).

    queued -> dispatching -> running -> succeeded | failed | cancelled
    dispatching -> queued        Ray unreachable, or a claim that never reached Ray
    failed | cancelled -> queued retry (resumes from the latest checkpoint)

A job can finish between two reconciler passes, so dispatching may also go straight to a final
state. Anything else is illegal, and an action that would need it answers 409.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    queued = "queued"
    dispatching = "dispatching"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


FINAL = frozenset({Status.succeeded, Status.failed, Status.cancelled})
ACTIVE = frozenset({Status.dispatching, Status.running})

ALLOWED: dict[Status, frozenset[Status]] = {
    Status.queued: frozenset({Status.dispatching, Status.cancelled}),
    Status.dispatching: frozenset({Status.queued, Status.running, *FINAL}),
    Status.running: FINAL,
    Status.succeeded: frozenset(),
    Status.failed: frozenset({Status.queued}),
    Status.cancelled: frozenset({Status.queued}),
}


def sources(target: Status) -> frozenset[Status]:
    """Every state from which `target` may be reached."""
    return frozenset(s for s, to in ALLOWED.items() if target in to)


class IllegalTransition(Exception):
    """An action that the experiment's current state does not allow (HTTP 409)."""

    def __init__(self, experiment_id: str, status: str, action: str, allowed: frozenset[Status]):
        self.experiment_id = experiment_id
        self.status = status
        names = ", ".join(sorted(allowed)) or "no state"
        super().__init__(f"cannot {action} experiment {experiment_id}: it is {status} (allowed from {names})")
