"""Typed messages from the link worker to the app: the only way data enters the UI.

Small dataclasses, as Toolong does it. Those that carry a whole picture (not a delta) say so with
`can_replace`, so a burst queued behind a busy UI collapses to the newest one.
"""

from dataclasses import dataclass, field

from textual.message import Message


@dataclass
class Attached(Message):
    """A daemon answered: `snapshot` is its `snapshot` reply (seq, status, sessions, samples, events)."""

    socket: str
    snapshot: dict


@dataclass
class Detached(Message):
    """No daemon answers (any more); the link keeps trying every second."""

    socket: str
    reason: str
    was_attached: bool

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Detached)


@dataclass
class EventBatch(Message):
    """Stream events newer than the snapshot, in seq order; the link batches them (≤ 10 a second)."""

    events: list[dict]
    lost: int = 0


@dataclass
class Polled(Message):
    """Fresh `status` and `session.list`, fetched once a second: the truth the events are checked against."""

    status: dict
    sessions: list[dict]

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Polled)


@dataclass
class Catalog(Message):
    """The reply to `scenario.list`, or why it failed (the scenarios package may be missing)."""

    scenarios: list[dict] = field(default_factory=list)
    error: str | None = None


@dataclass
class Runs(Message):
    """The reply to `scenario.runs`: runs that started before we attached."""

    runs: list[dict]
