"""The in-flight guard: no member of an audience has two jobs with different actions in flight.

Amazon applies a member's changes in the order it processes jobs, and jobs are processed
asynchronously: an ADD still PENDING and a later REMOVE sent meanwhile may land in either order.
So a change whose action differs from the member's in-flight job is held back (latest change
wins while it waits) until that job is terminal, then batched as usual. Changes with the same
action as the in-flight job are not held: applying either order gives the same state.

State is per process: partitions are keyed by profile, so a member's changes meet in one
process. Held changes keep their Kafka offsets uncommitted (at-least-once). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from syncd.model import Action, Batch, Destination, MemberRecord, SourceRef

Key = tuple[str, str]  # (audience, externalUserId)


@dataclass(slots=True)
class Held:
    destination: Destination
    record: MemberRecord
    refs: list[SourceRef] = field(default_factory=list)


class InflightGuard:
    def __init__(self) -> None:
        self._members: dict[Key, tuple[Action, int]] = {}  # key -> (action, batch token)
        self._batches: dict[int, list[Key]] = {}  # batch token -> its keys
        self._jobs: dict[str, int] = {}  # jobRequestId -> batch token
        self._held: dict[Key, Held] = {}
        self._unbound: dict[int, int] = {}  # id(batch) -> token, while the batch object lives
        self._next_token = 0

    def admit(self, destination: Destination, record: MemberRecord, ref: SourceRef) -> bool:
        """True: batch the change now. False: it is held (with its ref) until the job is done."""
        key = (destination.audience, record.external_user_id)
        held = self._held.get(key)
        if held is not None:  # a change is already waiting: the latest one waits in its place
            held.record = record
            held.refs.append(ref)
            return False
        inflight = self._members.get(key)
        if inflight is None or inflight[0] is record.action:
            return True
        self._held[key] = Held(destination, record, [ref])
        return False

    def readmit(self, held: Held) -> bool:
        """A released change: True if it may be batched now, else it is held again (another
        job with the other action went in flight meanwhile)."""
        key = (held.destination.audience, held.record.external_user_id)
        inflight = self._members.get(key)
        if key in self._held or (inflight is not None and inflight[0] is not held.record.action):
            self._held[key] = held
            return False
        return True

    def register(self, batch: Batch) -> None:
        """A batch is about to be sent: its members are in flight from now on."""
        self._next_token += 1
        token = self._unbound[id(batch)] = self._next_token
        keys = [(batch.destination.audience, r.external_user_id) for r in batch.records]
        for key, record in zip(keys, batch.records, strict=True):
            self._members[key] = (record.action, token)
        self._batches[token] = keys

    def bind(self, batch: Batch, job_request_id: str) -> None:
        """Amazon accepted the batch as `job_request_id`; it stays in flight until terminal."""
        self._jobs[job_request_id] = self._unbound.pop(id(batch))

    def split(self, batch: Batch, parts: list[Batch]) -> None:
        """The batch goes on as `parts` (a bisect of a refused batch): each part is in flight
        under a token of its own, so each member is released when its own part's job ends."""
        token = self._unbound.pop(id(batch))
        self._batches.pop(token, None)
        for part in parts:
            self._next_token += 1
            new = self._unbound[id(part)] = self._next_token
            keys = [(part.destination.audience, r.external_user_id) for r in part.records]
            for key in keys:
                entry = self._members.get(key)
                if entry is not None and entry[1] == token:  # not taken over by a later batch
                    self._members[key] = (entry[0], new)
            self._batches[new] = keys

    def forget(self, batch: Batch) -> list[Held]:
        """The batch never became a job (rejected): release its members."""
        return self._release(self._unbound.pop(id(batch)))

    def finished(self, job_request_id: str) -> list[Held]:
        """The job is terminal: release its members; returns the changes that were waiting."""
        token = self._jobs.pop(job_request_id, None)
        return [] if token is None else self._release(token)

    def jobs(self) -> list[str]:
        return list(self._jobs)

    @property
    def members(self) -> int:
        return len(self._members)

    @property
    def held(self) -> int:
        return len(self._held)

    def _release(self, token: int) -> list[Held]:
        released: list[Held] = []
        for key in self._batches.pop(token, []):
            entry = self._members.get(key)
            if entry is not None and entry[1] == token:
                del self._members[key]
                waiting = self._held.pop(key, None)
                if waiting is not None:
                    released.append(waiting)
        return released
