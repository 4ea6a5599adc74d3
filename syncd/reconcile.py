"""Reconcile: make one audience hold exactly a snapshot's members (`syncd reconcile`).

    snapshot (jsonl | csv | parquet, streamed) -> canonical event per line
      -> transform (the decode, route and hash of `syncd run`, in its worker processes)
      -> compare with the member table, a chunk at a time -> desired state (RECONCILE rank)
    then the audience's rows the snapshot lacks -> desired removes

Members of the snapshot become desired adds with the snapshot's identifiers (a changed
identifier is a change); rows the table holds as members and the snapshot lacks become desired
removes; equal ones cost nothing. Every change carries `occurred_at` = `--as-of` (default: the
reconcile's start) and `RECONCILE_POSITION`, so a live change at or after that time wins, and a
write applies only if the member's row is still as compared (`MemberTable.record_reconcile`).
The running `syncd run` replicas send it within the budget, after live changes and TTL
refreshes. The same snapshot again changes nothing; a run cut short, run again, does the rest.

Memory does not grow with the snapshot: lines are read and hashed a chunk at a time, and the
externalUserIds seen so far (for duplicates and for the removes) go to a temporary SQLite file,
not to memory. Unusable lines are counted by reason and listed by line number, never by value.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import csv
import math
import sqlite3
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import orjson

from syncd import config as config_mod
from syncd.config import Config
from syncd.errors import UsageError
from syncd.events.canonical import DecodeError, load, occurred_at, profile_id
from syncd.members import (
    ADD,
    RECONCILE_POSITION,
    REMOVE,
    HeldMember,
    MemberTable,
    ReconcileWrite,
    delete_record,
)
from syncd.model import Action, Destination, MemberRecord
from syncd.observability.logging import get_logger
from syncd.routing import external_user_id
from syncd.store import Store, command_store
from syncd.transform import Outcome, Refused, Spec
from syncd.transform_pool import Transformer

log = get_logger("syncd.reconcile")

FORMATS = ("jsonl", "csv", "parquet")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}
EXTENSIONS |= {".parquet": "parquet", ".pq": "parquet"}
COLUMNS = (
    "profile_id",
    "country",
    "email",
    "phone",
    "first_name",
    "last_name",
    "address",
    "city",
    "state",
    "postal_code",
)
IDENTIFIER_COLUMNS = COLUMNS[2:]
CHUNK_LINES = 2000  # lines hashed and compared as one chunk
WRITE_BATCH = 2000  # changes recorded per transaction (fewer commits; still short ones)
IN_FLIGHT = 2  # chunks in the transform at once (more only costs memory)
PAGE_ROWS = 2000  # member rows read per page for the removes
LISTED_LINES = 50  # line numbers listed per unusable reason (the count is exact)
WAIT_POLL_S = 1.0
IDLE_WARNING_S = 30.0  # --wait: no progress and no job for this long: nothing is sending


# -- reading snapshots ---------------------------------------------------------------------------
Line = tuple[int, dict[str, Any] | str]
"""(line number, a canonical event's fields without `audiences`, or an unusable reason)."""


def snapshot_format(path: Path, given: str | None) -> str:
    if given:
        return given
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(
            f"--snapshot: cannot tell the format of {path.name!r} from its extension; "
            f"give --format ({' | '.join(FORMATS)})"
        )
    return fmt


def read_snapshot(path: Path, fmt: str, max_bytes: int = 1_000_000) -> Iterator[Line]:
    """Each record of the snapshot, streamed, numbered from 1 (a JSON or CSV file's line, a
    Parquet file's row). Blank JSON lines are skipped."""
    if fmt == "jsonl":
        return _readable(path, _read_jsonl(path, max_bytes))
    if fmt == "csv":
        return _readable(path, _read_csv(path))
    if fmt == "parquet":
        return _read_parquet(path)
    raise UsageError(f"--format: unknown snapshot format {fmt!r}")


# a snapshot that stops being readable midway: its lines are recorded a chunk at a time, so
# those of the chunks under way when it stopped are not
_PARTLY_RECORDED = (
    "what the lines before it changed may be recorded, in part or not at all; nothing is removed"
)


def _readable(path: Path, lines: Iterator[Line]) -> Iterator[Line]:
    """`lines`; a file that cannot be read (permission denied, an I/O error) is a usage error
    naming it, not a traceback."""
    number = 0
    try:
        for number, item in lines:
            yield number, item
    except OSError as exc:
        after = (
            f" after line {number} ({_PARTLY_RECORDED}: run again once it can be read)"
            if number
            else ""
        )
        raise UsageError(
            f"--snapshot: cannot read {path}: {exc.strerror or type(exc).__name__}{after}"
        ) from None


def _read_jsonl(path: Path, max_bytes: int) -> Iterator[Line]:
    empty = True
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)  # as a CSV may start (utf-8-sig)
            if not line.strip():
                continue
            empty = False
            try:
                yield number, load(line, max_bytes)
            except DecodeError as exc:
                yield number, exc.reason
    if empty:  # no header says it is meant empty: that would remove every member
        raise UsageError(
            "--snapshot: the JSON lines file is empty (to empty the audience, give a CSV file "
            "holding only its header)"
        )


def _check_columns(names: Sequence[str], where: str, *, by_position: bool = False) -> None:
    """`by_position`: name unknown columns by their number, not their text (a CSV file without
    its header starts with a member's PII)."""
    unknown = [(i, n) for i, n in enumerate(names, start=1) if n not in COLUMNS]
    if unknown:
        shown = (
            f"columns {', '.join(str(i) for i, _ in unknown)} (by number: a file without its "
            "header would start with a member)"
            if by_position
            else f"columns {[n for _, n in unknown]!r}"
        )
        raise UsageError(f"--snapshot: {where} names unknown {shown}; known: {', '.join(COLUMNS)}")
    if "profile_id" not in names:
        raise UsageError(f"--snapshot: {where} has no profile_id column")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # which one would count?
        raise UsageError(f"--snapshot: {where} names the columns {twice!r} twice or more")


def _fields(values: dict[str, Any]) -> dict[str, Any]:
    """A row of named columns -> a canonical event's fields (empty cells are absent)."""
    doc: dict[str, Any] = {"profile_id": values.get("profile_id")}
    country = values.get("country")
    if country not in (None, ""):
        doc["country"] = country
    doc["identifiers"] = {
        k: v for k in IDENTIFIER_COLUMNS if (v := values.get(k)) is not None and v != ""
    }
    return doc


def _open_csv(path: Path) -> TextIO:
    # surrogateescape: a byte that is not UTF-8 becomes an unusable line, not a crash
    return path.open(newline="", encoding="utf-8-sig", errors="surrogateescape")


def _check_csv(path: Path) -> None:
    """Read the file through once: a row the csv module refuses (a cell past its 128 KiB
    limit) refuses the snapshot before anything of it is recorded, not after the lines before
    it were."""
    with _open_csv(path) as f:
        reader = csv.reader(f)
        line = 1
        try:
            for _ in reader:
                line = reader.line_num + 1
        except csv.Error as exc:
            raise UsageError(
                f"--snapshot: line {line}: {exc} (nothing is recorded: fix the file and run again)"
            ) from None


def _read_csv(path: Path) -> Iterator[Line]:
    _check_csv(path)
    with _open_csv(path) as f:
        reader = csv.reader(f)
        header = next((row for row in reader if any(cell.strip() for cell in row)), None)
        if header is None:  # not an empty snapshot: that would remove every member
            raise UsageError("--snapshot: the CSV file is empty (no header with profile_id)")
        names = [h.strip() for h in header]
        _check_columns(names, "the CSV header", by_position=True)
        line = reader.line_num + 1
        rows = iter(reader)
        while True:
            try:
                row = next(rows, None)
            except csv.Error as exc:  # the file changed since `_check_csv` read it
                raise UsageError(
                    f"--snapshot: line {line}: {exc} ({_PARTLY_RECORDED}: fix the file and "
                    "run again)"
                ) from None
            if row is None:
                return
            number, line = line, reader.line_num + 1
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(names) or (line - number > 1 and _swallowed(names, row)):
                yield number, "bad_csv_row"
                continue
            yield number, _fields(dict(zip(names, row, strict=True)))


def _swallowed(names: list[str], row: list[str]) -> bool:
    """A row over several lines that a quote left open made of the rows after it, whose members
    cannot be read: a line break in any cell but an address, or an address line after the
    first holding a comma (the cells of another row). A quoted address over lines is legal."""
    for name, cell in zip(names, row, strict=True):
        later = cell.splitlines()[1:]
        if later and (name != "address" or any("," in part for part in later)):
            return True
    return False


def _read_parquet(path: Path) -> Iterator[Line]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        names = list(parquet.schema_arrow.names)
        _check_columns(names, "the Parquet schema")
        for column in parquet.schema_arrow:
            if not _text_type(column.type):
                raise UsageError(
                    f"--snapshot: the Parquet column {column.name!r} is of type {column.type}; a "
                    "column holds text, numbers, or lists of them"
                )
        number = 0
        for batch in parquet.iter_batches(batch_size=CHUNK_LINES, columns=names):
            columns = {name: batch.column(name).to_pylist() for name in names}
            for i in range(batch.num_rows):
                number += 1
                values = {name: _cell(columns[name][i]) for name in names}
                yield number, _fields(values)
    except (pa.ArrowException, OSError) as exc:  # where the file is broken, not what it holds
        raise UsageError(f"--snapshot: not a readable Parquet file ({exc})") from None


def _text_type(kind: Any, *, in_list: bool = False) -> bool:
    """Whether a Parquet column of arrow type `kind` holds what a CSV cell would (text, a
    number, all nulls), or a list of it (several values of an identifier)."""
    import pyarrow.types as t

    if t.is_dictionary(kind):
        return _text_type(kind.value_type, in_list=in_list)
    if (t.is_list(kind) or t.is_large_list(kind)) and not in_list:
        return _text_type(kind.value_type, in_list=True)
    return bool(
        t.is_string(kind)
        or t.is_large_string(kind)
        or t.is_binary(kind)
        or t.is_large_binary(kind)
        or t.is_integer(kind)
        or t.is_floating(kind)
        or t.is_decimal(kind)
        or t.is_null(kind)
    )


def _cell(value: Any) -> Any:
    """A Parquet cell as the text a CSV cell would hold (an integer column of profile ids or
    phone numbers reads as their digits, and so does a whole float); a list cell is several
    values (an identifier may have several)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, float) and math.isnan(value):
        return None  # how some writers keep a missing value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return [_cell(item) for item in value]
    return str(value)


def member_id(fields: dict[str, Any]) -> str | None:
    """The externalUserId of a snapshot record, as ingest maps its profile id (None: none)."""
    try:
        return external_user_id(profile_id(fields.get("profile_id"), "profile_id"))
    except DecodeError:
        return None


def event_bytes(fields: dict[str, Any], audience: str) -> bytes | str:
    """A snapshot record as a canonical event adding the member to `audience` (the input of
    the pipeline's transform), or an unusable reason. Its `occurred_at` is not read: every
    change of a reconcile carries `--as-of`."""
    if fields.get("audiences") is not None:
        return "has_audiences"
    if fields.get("erase") not in (None, False):
        return "has_erase"
    doc = {k: v for k, v in fields.items() if k not in ("occurred_at", "event_id")}
    doc["audiences"] = {"add": [audience]}
    try:
        return orjson.dumps(doc)
    except orjson.JSONEncodeError:
        return "not_utf8"


# -- comparing -----------------------------------------------------------------------------------
ADDED = "adds"
CHANGED = "changes"
REMOVED = "removes"
UNCHANGED = "unchanged"
WITHDRAWN = "withdrawn"  # a member Amazon was never sent: recorded removed, nothing to send
NEWER = "newer"  # the member changed at or after --as-of: that change stands
INVALID = "invalid"  # Amazon refused the member as it stands: not removed (nothing to remove)
KINDS = (ADDED, CHANGED, REMOVED, UNCHANGED, WITHDRAWN, NEWER, INVALID)


def compare_member(
    euid: str, action: str, record: bytes, digest: bytes, held: HeldMember | None, as_of: float
) -> tuple[str, ReconcileWrite | None]:
    """A snapshot member (its desired `action`, ADD, or REMOVE under a strict consent policy)
    against its row: what kind of change it is and the write it needs."""
    if held is not None:
        if held.action == action and (action == REMOVE or held.digest == digest):
            return UNCHANGED, None
        if held.order >= (as_of, RECONCILE_POSITION):
            return NEWER, None
    if action == REMOVE:  # as for a member the snapshot lacks: never sent or refused, skipped
        if held is None:
            return WITHDRAWN, None  # Amazon was never sent it: nothing to record or send
        if held.invalid:
            return INVALID, None
        kind = WITHDRAWN if held.never_sent else REMOVED
    else:
        kind = CHANGED if held and held.action == ADD else ADDED
    return kind, ReconcileWrite(euid, action, record, digest, held, kind)


def compare_absent(held: HeldMember, as_of: float) -> tuple[str | None, ReconcileWrite | None]:
    """A row the snapshot lacks: a member to remove (None: it is no member)."""
    if held.action != ADD:
        return None, None
    if held.invalid:
        return INVALID, None
    if held.order >= (as_of, RECONCILE_POSITION):
        return NEWER, None
    assert held.record is not None
    kind = WITHDRAWN if held.never_sent else REMOVED
    write = ReconcileWrite(
        held.external_user_id, REMOVE, delete_record(held.record), held.digest, held, kind
    )
    return kind, write


# -- the run -------------------------------------------------------------------------------------
Chunk = tuple[list[int], list["str | None"], Awaitable[tuple[list[Outcome], Any]]]
"""Line numbers, their members' externalUserIds (None: no profile id) and the transform's
result."""


@dataclass(slots=True)
class Report:
    """What a reconcile found and did."""

    as_of: float = 0.0  # when the reconcile's changes happen (--as-of)
    counts: Counter[str] = field(default_factory=Counter)  # KINDS
    unusable: Counter[str] = field(default_factory=Counter)  # reason -> lines
    unusable_lines: dict[str, list[int]] = field(default_factory=dict)  # the first few
    unknown: int = 0  # unusable lines whose member cannot be read: none absent is removed
    refused_before: int = 0  # unchanged members whose row Amazon refused as it stands
    changed_meanwhile: int = 0  # rows that changed between compare and write
    erased: int = 0  # members erased at or after --as-of
    lines: int = 0

    def bad(self, number: int, reason: str) -> None:
        self.unusable[reason] += 1
        listed = self.unusable_lines.setdefault(reason, [])
        if len(listed) < LISTED_LINES:
            listed.append(number)

    @property
    def complete(self) -> bool:
        """Lines, every one usable (a duplicate aside: its first line stands): the snapshot says
        what the whole audience holds at --as-of, so a live change older than that is
        superseded."""
        usable = sum(self.unusable.values()) == self.unusable["duplicate_profile_id"]
        return self.lines > 0 and usable

    @property
    def to_send(self) -> int:
        return self.counts[ADDED] + self.counts[CHANGED] + self.counts[REMOVED]


class Seen:
    """The externalUserIds of the snapshot so far, in a temporary SQLite file (memory stays
    flat whatever the snapshot's size)."""

    def __init__(self, directory: str) -> None:
        self._db = sqlite3.connect(Path(directory) / "seen.db", isolation_level=None)
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.execute("PRAGMA cache_size = -16384")  # 16 MiB
        self._db.execute("CREATE TABLE seen (id TEXT PRIMARY KEY) WITHOUT ROWID")
        # members of unusable lines: neither added nor removed (a typo must not remove one)
        self._db.execute("CREATE TABLE kept (id TEXT PRIMARY KEY) WITHOUT ROWID")

    def add(self, ids: Sequence[str]) -> list[bool]:
        """Add `ids` in order; True for each one not seen before (in the snapshot so far)."""
        self._db.execute("BEGIN")
        before = self._db.total_changes
        self._db.executemany("INSERT OR IGNORE INTO seen VALUES (?)", ((e,) for e in ids))
        if self._db.total_changes - before == len(ids):  # the common case: no duplicate
            self._db.execute("COMMIT")
            return [True] * len(ids)
        self._db.execute("ROLLBACK")
        self._db.execute("BEGIN")
        fresh: list[bool] = []
        for euid in ids:
            cursor = self._db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (euid,))
            fresh.append(cursor.rowcount == 1)
        self._db.execute("COMMIT")
        return fresh

    def keep(self, ids: Sequence[str]) -> None:
        """Members of unusable lines: `known` from now on, without being seen."""
        if ids:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO kept VALUES (?)", ((e,) for e in ids))
            self._db.execute("COMMIT")

    def known(self, ids: Sequence[str]) -> set[str]:
        """Those of `ids` seen or kept."""
        found: set[str] = set()
        for start in range(0, len(ids), 400):
            part = ids[start : start + 400]
            marks = ",".join("?" * len(part))
            query = (
                f"SELECT id FROM seen WHERE id IN ({marks}) "
                f"UNION ALL SELECT id FROM kept WHERE id IN ({marks})"
            )
            found.update(row[0] for row in self._db.execute(query, [*part, *part]))
        return found

    def close(self) -> None:
        self._db.close()


class Reconciler:
    """One reconcile of one destination against the member table."""

    def __init__(
        self,
        cfg: Config,
        dest: Destination,
        members: MemberTable,
        *,
        as_of: float,
        dry_run: bool,
        as_of_given: bool = False,
        workers: int | None = None,
    ) -> None:
        """`as_of_given`: `as_of` is the snapshot's time (--as-of), not merely when the run
        started: only then does a complete snapshot supersede older live changes."""
        self._cfg = cfg
        self._dest = dest
        self._members = members
        self._as_of = as_of
        self._as_of_given = as_of_given
        self._dry_run = dry_run
        self._transformer = Transformer(
            Spec(
                (dest,),
                "canonical",
                cfg.kafka.max_message_bytes,
                cfg.pii.strict_reference,
            ),
            workers=cfg.transform.workers if workers is None else workers,
        )
        self.report = Report(as_of=as_of)
        self._writes: list[ReconcileWrite] = []

    async def run(self, lines: Iterable[Line]) -> Report:
        with tempfile.TemporaryDirectory(prefix="syncd-reconcile-") as tmp:
            seen = Seen(tmp)
            try:
                async with self._transformer:
                    await self._snapshot(lines, seen)
                    await self._flush()
                    if not self.report.unknown:  # else any member may be an unusable line's
                        await self._absent(seen)
                        await self._flush()
                    if self._as_of_given and self.report.complete and not self._dry_run:
                        await self._members.mark_reconciled(self._dest.audience_id, self._as_of)
            finally:
                seen.close()
        return self.report

    async def _snapshot(self, lines: Iterable[Line], seen: Seen) -> None:
        """The snapshot's members, a chunk at a time; up to IN_FLIGHT chunks in the transform
        while the oldest is compared and recorded."""
        in_flight: deque[Chunk] = deque()
        numbers: list[int] = []
        values: list[bytes | None] = []
        ids: list[str | None] = []
        for number, item in lines:
            self.report.lines += 1
            value = item if isinstance(item, str) else event_bytes(item, self._dest.audience)
            if isinstance(value, str):
                self.report.bad(number, value)
                if not isinstance(item, str) and (euid := member_id(item)) is not None:
                    seen.keep([euid])
                else:
                    self.report.unknown += 1
                continue
            numbers.append(number)
            values.append(value)
            ids.append(member_id(item) if isinstance(item, dict) else None)
            if len(values) >= CHUNK_LINES:
                in_flight.append((numbers, ids, self._transformer.submit(values)))
                numbers, values, ids = [], [], []
                if len(in_flight) >= IN_FLIGHT:
                    await self._compare(*in_flight.popleft(), seen)
        if values:
            in_flight.append((numbers, ids, self._transformer.submit(values)))
        while in_flight:
            await self._compare(*in_flight.popleft(), seen)

    async def _compare(
        self,
        numbers: list[int],
        ids: list[str | None],
        transformed: Awaitable[tuple[list[Outcome], Any]],
        seen: Seen,
    ) -> None:
        outcomes, _ = await transformed
        records: list[tuple[int, MemberRecord]] = []
        kept: list[str] = []
        for number, euid, outcome in zip(numbers, ids, outcomes, strict=True):
            if isinstance(outcome, Refused):
                reason = outcome.reason
            elif not isinstance(outcome, list) or len(outcome) != 1:
                reason = "not_a_member"  # cannot happen: no erase, one audience
            elif outcome[0][1].dead_letter:
                reason = outcome[0][1].dead_letter
            else:
                records.append((number, outcome[0][1]))
                continue
            self.report.bad(number, reason)
            if euid is not None:
                kept.append(euid)
            else:
                self.report.unknown += 1
        seen.keep(kept)
        fresh = seen.add([r.external_user_id for _, r in records])
        chosen: list[MemberRecord] = []
        for (number, record), new in zip(records, fresh, strict=True):
            if new:
                chosen.append(record)
            else:
                self.report.bad(number, "duplicate_profile_id")
        held = await self._members.held_members(
            self._dest.audience_id, [r.external_user_id for r in chosen]
        )
        writes: list[ReconcileWrite] = []
        for record in chosen:
            action = ADD if record.action is Action.ADD else REMOVE
            kind, write = compare_member(
                record.external_user_id,
                action,
                record.json,
                record.digest,
                held.get(record.external_user_id),
                self._as_of,
            )
            self.report.counts[kind] += 1
            if kind == UNCHANGED and (row := held.get(record.external_user_id)) and row.invalid:
                self.report.refused_before += 1
            if write is not None:
                writes.append(write)
        await self._record(writes)

    async def _absent(self, seen: Seen) -> None:
        """The audience's rows the snapshot lacks, a page at a time in key order."""
        after: str | None = None
        while True:
            page = await self._members.held_page(
                self._dest.audience_id, after, PAGE_ROWS, action=ADD
            )
            if not page:
                return
            after = page[-1].external_user_id
            known = seen.known([h.external_user_id for h in page])
            writes: list[ReconcileWrite] = []
            for held in page:
                if held.external_user_id in known:
                    continue
                kind, write = compare_absent(held, self._as_of)
                if kind is not None:
                    self.report.counts[kind] += 1
                if write is not None:
                    writes.append(write)
            await self._record(writes)

    async def _record(self, writes: list[ReconcileWrite]) -> None:
        """Record `writes` once WRITE_BATCH of them wait (a commit per few chunks). A dry run
        records nothing, and counts what the write would leave out: members erased at or after
        --as-of."""
        if self._dry_run:
            if writes:
                erased = await self._members.erased_since(
                    self._dest.audience_id, [w.external_user_id for w in writes], self._as_of
                )
                skipped = Counter(w.kind for w in writes if w.external_user_id in erased)
                self.report.erased += skipped.total()
                self.report.counts.subtract(skipped)
            return
        self._writes += writes
        if len(self._writes) >= WRITE_BATCH:
            await self._flush()

    async def _flush(self) -> None:
        writes, self._writes = self._writes, []
        if writes:
            done = await self._members.record_reconcile(
                self._dest.audience_id, writes, occurred_at=self._as_of
            )
            self.report.changed_meanwhile += done.changed
            self.report.erased += done.erased
            self.report.counts.subtract(done.skipped)  # counted when compared, not recorded


# -- the budget's view ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BudgetView:
    waiting: int  # due on the connection now (this reconcile's included unless a dry run)
    remaining: int  # records the current rolling window still allows
    per_hour: int
    window_s: float

    def seconds(self, records: int) -> float:
        """How long the connection's budget needs to send `records` more than what fits now."""
        rate = self.per_hour / self.window_s  # records per second, sustained
        return max(0, records - self.remaining) / rate


async def budget_view(
    cfg: Config, dest: Destination, members: MemberTable, store: Store
) -> BudgetView:
    audience_ids = [
        d.audience_id
        for d in cfg.destinations
        if d.connection_id == dest.connection_id and not d.paused
    ] or [dest.audience_id]
    waiting = await members.waiting(audience_ids)
    window_s = float(cfg.budget.window_seconds)
    used = await store.budget_used(dest.connection_id, window_s, cfg.amazon.post_flight_s)
    return BudgetView(
        waiting,
        max(0, cfg.budget.records_per_hour - used),
        cfg.budget.records_per_hour,
        float(cfg.budget.window_seconds),
    )


def duration(seconds: float) -> str:
    if seconds < 1:
        return "< 1 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def summary(report: Report, dest: Destination, view: BudgetView, *, dry_run: bool) -> str:
    c = report.counts
    verb = "would record" if dry_run else "recorded"
    lines = [
        f"reconcile of audience {dest.audience!r} (audience_id {dest.audience_id}): "
        f"{report.lines} snapshot lines; {verb}:",
        f"  adds       {c[ADDED]}",
        f"  changes    {c[CHANGED]}  (members whose identifiers changed: sent again)",
        f"  removes    {c[REMOVED]}",
        f"  unchanged  {c[UNCHANGED]}"
        + (
            f"  ({report.refused_before} refused by Amazon as they stand)"
            if report.refused_before
            else ""
        ),
        f"  unusable   {sum(report.unusable.values())}"
        + ("  (their members are left as they are)" if report.unusable else ""),
    ]
    for reason, n in sorted(report.unusable.items()):
        listed = report.unusable_lines[reason]
        more = f" and {n - len(listed)} more" if n > len(listed) else ""
        lines.append(f"    {reason}: {n} (lines {', '.join(map(str, listed))}{more})")
    if report.unknown:
        lines.append(
            f"  absent     not removed: {report.unknown} unusable lines name no member that "
            "can be read, and any member may be theirs; fix them and run again"
        )
    if c[WITHDRAWN]:
        lines.append(f"  withdrawn  {c[WITHDRAWN]}  (never sent to Amazon: nothing to remove)")
    if c[NEWER]:
        lines.append(f"  kept       {c[NEWER]}  (a live change at or after --as-of stands)")
    if c[INVALID]:
        lines.append(f"  skipped    {c[INVALID]}  (refused by Amazon: nothing to remove)")
    if report.changed_meanwhile:
        lines.append(
            f"  left       {report.changed_meanwhile}  (changed while compared: that change "
            "stands; run again to compare them anew)"
        )
    if report.erased:
        lines.append(f"  erased     {report.erased}  (erased at or after --as-of)")
    to_send = report.to_send
    ahead = max(0, view.waiting - (0 if dry_run else to_send))
    total = ahead + to_send if dry_run else view.waiting
    lines.append(
        f"records to send: {to_send}; waiting on connection {dest.connection_id}: "
        f"{total} in all (live changes and refreshes go first)"
    )
    needs = view.seconds(total)
    lines.append(
        f"budget: {view.per_hour} records per {view.window_s:.0f} s, {view.remaining} left in "
        "the current window: "
        + (
            "it all fits now (the budget does not hold it back)"
            if needs == 0
            else f"about {duration(needs)} until the budget has let it all through"
        )
    )
    if dest.paused:
        lines.append("the destination is paused: nothing is sent until it is unpaused")
    return "\n".join(lines)


# -- --wait --------------------------------------------------------------------------------------
async def wait_for_amazon(
    members: MemberTable, dest: Destination, timeout: float | None, out: Any, report: Report
) -> int:
    """Show progress until the audience's reconcile changes are settled: 0 when Amazon accepted
    all of it, 1 when `report`'s reconcile has refused members (its own changes refused, and
    members of its snapshot whose rows Amazon had refused as they stand) or `timeout` ran
    out. What an earlier reconcile had refused of members this one no longer names is not
    counted."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(file=out)
    left, refused = await members.reconcile_progress(dest.audience_id, report.as_of)
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    last_progress = start
    warned = False
    # nothing sent for this long (and no job, no claim): say so (a short --timeout: sooner)
    idle_warning_s = IDLE_WARNING_S if timeout is None else min(IDLE_WARNING_S, timeout / 2)
    with Progress(
        TextColumn("sending"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as progress:
        total = left
        task = progress.add_task("reconcile", total=max(total, 1), completed=0)
        while left > 0:
            if deadline is not None and time.monotonic() >= deadline:
                progress.stop()
                console.print(
                    f"timed out: {left} of {total} not accepted yet (they stay recorded; "
                    "syncd run sends them)"
                )
                return 1
            await asyncio.sleep(WAIT_POLL_S)  # the polling cadence of --wait, not a sync point
            now_left, refused = await members.reconcile_progress(dest.audience_id, report.as_of)
            if now_left < left or now_left > total:
                last_progress = time.monotonic()
            total = max(total, now_left)
            left = now_left
            progress.update(task, total=max(total, 1), completed=total - left)
            idle = time.monotonic() - last_progress
            if (
                not warned
                and left
                and idle >= idle_warning_s
                and not await members.sending(dest.connection_id, dest.audience_id, idle)
            ):
                paused = " (the destination is paused)" if dest.paused else ""
                console.print(
                    f"nothing is sending: no job for connection {dest.connection_id} in "
                    f"{idle:.0f} s; is `syncd run` running{paused}?"
                )
                warned = True
    refused += report.refused_before
    if refused:
        print(f"refused by Amazon: {refused} (see the member dead letters)", file=out)
        return 1
    print("Amazon accepted all of it", file=out)
    return 0


# -- command line --------------------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    rec = sub.add_parser(
        "reconcile",
        help="make an audience hold exactly a snapshot's members",
        description="Compare a snapshot of who should be in an audience with the store and "
        "record the difference; `syncd run` sends it within the budget, after live changes.",
    )
    rec.add_argument("--config", required=True, help="TOML config file")
    rec.add_argument("--audience", required=True, help="the destination's audience key")
    rec.add_argument("--snapshot", required=True, help="JSON lines, CSV or Parquet file")
    rec.add_argument("--format", choices=FORMATS, help="default: from the file's extension")
    rec.add_argument("--dry-run", action="store_true", help="compare only; change nothing")
    rec.add_argument("--wait", action="store_true", help="show progress until Amazon accepted")
    rec.add_argument("--timeout", type=_seconds, help="with --wait: give up after S seconds")
    rec.add_argument(
        "--as-of", help="ISO-8601 time of the snapshot (default: now); newer changes win"
    )
    rec.set_defaults(func=_cmd_reconcile)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return value


def _as_of(text: str | None) -> float:
    if text is None:
        return time.time()
    try:
        at = occurred_at(text, "--as-of")
    except DecodeError as exc:
        raise UsageError(f"--as-of: {exc.detail}") from None
    assert at is not None
    if at < 0:  # no snapshot predates the epoch (year 1 could not even be printed)
        raise UsageError(f"--as-of: {text!r} is before 1970-01-01T00:00:00Z")
    return at


def _cmd_reconcile(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    if args.timeout is not None and not args.wait:
        raise UsageError("--timeout: only with --wait")
    if args.wait and args.dry_run:
        raise UsageError("--wait: a --dry-run records nothing to wait for")
    dest = next((d for d in cfg.destinations if d.audience == args.audience), None)
    if dest is None:
        raise UsageError(f"--audience: no destination has audience {args.audience!r}")
    path = Path(args.snapshot)
    if not path.is_file():
        problem = "not a regular file" if path.exists() else "no such file"
        raise UsageError(f"--snapshot: {problem}: {path}")
    fmt = snapshot_format(path, args.format)
    as_of = _as_of(args.as_of)
    return asyncio.run(
        reconcile(
            cfg,
            dest,
            path,
            fmt,
            as_of=as_of,
            as_of_given=args.as_of is not None,
            dry_run=args.dry_run,
            wait=args.wait,
            timeout=args.timeout,
        )
    )


async def reconcile(
    cfg: Config,
    dest: Destination,
    path: Path,
    fmt: str,
    *,
    as_of: float,
    as_of_given: bool = False,
    dry_run: bool = False,
    wait: bool = False,
    timeout: float | None = None,
    out: Any = None,
) -> int:
    out = sys.stdout if out is None else out
    lines = read_snapshot(path, fmt, cfg.kafka.max_message_bytes)
    async with command_store(
        cfg.store.url, cfg.store.statement_timeout_s, writes=not dry_run
    ) as store:
        members = MemberTable(store)
        started = datetime.fromtimestamp(as_of, UTC).isoformat().replace("+00:00", "Z")
        log.info("reconcile started", audience=dest.audience, as_of=started, dry_run=dry_run)
        reconciler = Reconciler(
            cfg, dest, members, as_of=as_of, as_of_given=as_of_given, dry_run=dry_run
        )
        report = await reconciler.run(lines)
        view = await budget_view(cfg, dest, members, store)
        print(summary(report, dest, view, dry_run=dry_run), file=out, flush=True)
        log.info(
            "reconcile recorded",
            audience=dest.audience,
            dry_run=dry_run,
            **{k: report.counts[k] for k in KINDS},
            unusable=sum(report.unusable.values()),
        )
        code = 1 if report.unknown else 0  # not all done: the absent were not removed
        if wait and not dry_run:
            return max(code, await wait_for_amazon(members, dest, timeout, out, report))
        return code
