"""`syncd reconcile` below the process level: the snapshot readers (JSON lines, CSV, Parquet give
the same members; bad lines by number and reason), the compare rules, and a whole reconcile
against the member table on SQLite (injected clock): the desired state equals the snapshot for
any table and snapshot (hypothesis), the same snapshot again writes nothing, a row that changed
since compared or holds a newer change is left alone, and reconcile work is claimed after live
changes and TTL refreshes."""

from __future__ import annotations

import asyncio
import csv
import errno
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from syncd import config as config_mod
from syncd import reconcile as reconcile_mod
from syncd.config import Config
from syncd.errors import UsageError
from syncd.members import (
    ADD,
    BACKGROUND,
    RECONCILE,
    REMOVE,
    HeldMember,
    MemberTable,
    member_change,
)
from syncd.model import Action, Destination
from syncd.pii import build_hashed_pii
from syncd.reconcile import (
    ADDED,
    CHANGED,
    INVALID,
    NEWER,
    REMOVED,
    UNCHANGED,
    WITHDRAWN,
    BudgetView,
    Reconciler,
    Report,
    budget_view,
    compare_absent,
    compare_member,
    read_snapshot,
    snapshot_format,
    summary,
    wait_for_amazon,
)
from syncd.store import Store
from syncd.store.schema import members
from tests.fakes import T0, FakeClock

AUDIENCE_ID = 413642381039213536
AS_OF = T0 + 100.0
LEASE = 60.0
ROWS = [
    {"profile_id": "p1", "country": "US", "email": "Jane.Doe@Example.com", "phone": ""},
    {"profile_id": "p2", "country": "", "email": "b@example.com", "phone": "+1 206 266 1000"},
    {"profile_id": "p3", "country": "GB", "email": "c@example.co.uk", "phone": ""},
]


def config(**sections: Any) -> Config:
    return config_mod.from_mapping(
        {
            **sections,
            "transform": {"workers": 0},
            "destinations": [
                {
                    "audience": "vip",
                    "connection_id": "5a523424-e8b3-4da5-9a32-24a861aea576",
                    "audience_id": AUDIENCE_ID,
                    "country_code": "US",
                }
            ],
        }
    )


CFG = config()
DEST: Destination = CFG.destinations[0]


def jsonl(rows: list[dict[str, str]]) -> bytes:
    out = []
    for r in rows:
        ids = {k: v for k, v in r.items() if k not in ("profile_id", "country") and v}
        doc: dict[str, Any] = {"profile_id": r["profile_id"], "identifiers": ids}
        if r.get("country"):
            doc["country"] = r["country"]
        out.append(orjson.dumps(doc))
    return b"\n".join(out) + b"\n"


def csv_text(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_snapshots(tmp: Path, rows: list[dict[str, str]]) -> dict[str, Path]:
    paths = {"jsonl": tmp / "s.jsonl", "csv": tmp / "s.csv", "parquet": tmp / "s.parquet"}
    paths["jsonl"].write_bytes(jsonl(rows))
    paths["csv"].write_text(csv_text(rows))
    columns = {k: [r[k] or None for r in rows] for k in rows[0]}
    pq.write_table(pa.table(columns), paths["parquet"])
    return paths


def record_of(profile: str, email: str, country: str = "US") -> tuple[bytes, bytes]:
    """The record and digest the pipeline makes of a member with one email."""
    from syncd.model import member_record, record_digest

    pii = build_hashed_pii({"email": [email]}, country, strict_reference=False)
    record = member_record(profile, country, Action.ADD, pii.objects).json
    return record, record_digest(record)


async def reconcile(
    table: MemberTable,
    path: Path,
    fmt: str,
    *,
    dry_run: bool = False,
    as_of: float = AS_OF,
    as_of_given: bool = False,
) -> Report:
    lines = read_snapshot(path, fmt)
    reconciler = Reconciler(
        CFG, DEST, table, as_of=as_of, as_of_given=as_of_given, dry_run=dry_run, workers=0
    )
    return await reconciler.run(lines)


async def stream(table: MemberTable, members_: dict[str, str], at: float = T0) -> None:
    """Live adds of `members_` ({profile: email}), as ingest records them."""
    from syncd.model import member_record

    changes = []
    for i, (profile, email) in enumerate(sorted(members_.items())):
        pii = build_hashed_pii({"email": [email]}, "US", strict_reference=False)
        rec = member_record(profile, "US", Action.ADD, pii.objects)
        changes.append(member_change(AUDIENCE_ID, rec, occurred_at=at, position=i))
    await table.record_changes(changes)


async def send_all(table: MemberTable, job: str = "job") -> int:
    """Claim everything due, store it sent and confirmed (Amazon accepted it)."""
    sent = 0
    while claims := await table.claim_due([AUDIENCE_ID], 1000, LEASE, "sender"):
        assert await table.mark_sent(claims, f"{job}-{sent}") == []
        await table.apply_job_outcome(f"{job}-{sent}", "SUCCEEDED")
        sent += len(claims)
    return sent


async def desired(table: MemberTable) -> dict[str, tuple[str, bytes]]:
    async with table._store._read() as conn:
        rows = await conn.execute(
            select(members.c.external_user_id, members.c.action, members.c.digest).where(
                members.c.audience_id == AUDIENCE_ID
            )
        )
        return {e: (a, bytes(d)) for e, a, d in rows}


# -- readers -------------------------------------------------------------------------------------
def test_the_format_comes_from_the_extension_unless_given(tmp_path: Path) -> None:
    assert snapshot_format(tmp_path / "a.jsonl", None) == "jsonl"
    assert snapshot_format(tmp_path / "a.CSV", None) == "csv"
    assert snapshot_format(tmp_path / "a.parquet", None) == "parquet"
    assert snapshot_format(tmp_path / "a.txt", "csv") == "csv"
    with pytest.raises(UsageError, match="--format"):
        snapshot_format(tmp_path / "a.txt", None)


async def test_csv_json_lines_and_parquet_give_the_same_desired_state(
    tmp_path: Path, clock: FakeClock
) -> None:
    paths = write_snapshots(tmp_path, ROWS)
    states = {}
    for fmt, path in paths.items():
        store = await Store.connect(f"sqlite+aiosqlite:///{tmp_path / fmt}.db", clock=clock)
        await store.ensure_schema(auto_upgrade=True)
        try:
            t = MemberTable(store)
            report = await reconcile(t, path, fmt)
            assert report.counts[ADDED] == 3
            assert not report.unusable
            states[fmt] = await desired(t)
        finally:
            await store.close()
    assert states["jsonl"] == states["csv"] == states["parquet"]
    assert set(states["csv"]) == {"p1", "p2", "p3"}


def test_bad_lines_are_reported_by_number_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(
        b'{"profile_id": "ok1", "identifiers": {"email": "a@example.com"}}\n'
        b"not json\n"
        b"\n"
        b'{"identifiers": {"email": "b@example.com"}}\n'
        b'{"profile_id": "x", "audiences": {"add": ["vip"]}, "identifiers": {"email": "c@x.io"}}\n'
        b'{"profile_id": "ok2", "identifiers": {"email": "d@example.com"}}\n'
    )
    lines = list(read_snapshot(path, "jsonl"))
    assert [n for n, _ in lines] == [1, 2, 4, 5, 6]  # the blank line is skipped
    assert lines[1][1] == "not_json"
    assert isinstance(lines[0][1], dict)


async def test_unusable_lines_are_counted_and_the_rest_goes_through(
    tmp_path: Path, table: MemberTable
) -> None:
    path = tmp_path / "s.csv"
    path.write_text(
        "profile_id,email,country\n"
        "ok1,a@example.com,US\n"
        "bad-country,b@example.com,Narnia\n"
        ",c@example.com,US\n"
        "no-id,,US\n"
        "ok1,a@example.com,US\n"
        "short,row\n"
        "ok2,e@example.com,\n"
    )
    await stream(table, {"bad-country": "b@example.com", "gone": "g@example.com"})
    await send_all(table)
    report = await reconcile(table, path, "csv")
    assert report.counts[ADDED] == 2
    # The member of an unusable line is neither added nor removed. Two lines name no member
    # that can be read (no profile id; a row whose cells cannot be told apart): any member
    # may be theirs, so none the snapshot lacks is removed ("gone" stays).
    assert report.counts[REMOVED] == 0
    assert report.unknown == 2
    assert dict(report.unusable) == {
        "bad_country": 1,
        "no_profile_id": 1,
        "no_usable_identifier": 1,
        "duplicate_profile_id": 1,
        "bad_csv_row": 1,
    }
    assert report.unusable_lines == {
        "bad_country": [3],
        "no_profile_id": [4],
        "no_usable_identifier": [5],
        "duplicate_profile_id": [6],
        "bad_csv_row": [7],
    }
    assert {p for p, (a, _) in (await desired(table)).items() if a == ADD} == {
        "ok1",
        "ok2",
        "bad-country",
        "gone",
    }
    view = BudgetView(waiting=2, remaining=5000, per_hour=3600, window_s=3600.0)
    assert "2 unusable lines name no member" in summary(report, DEST, view, dry_run=False)


async def test_a_row_split_by_an_unquoted_comma_removes_no_member(
    tmp_path: Path, table: MemberTable
) -> None:
    path = tmp_path / "s.csv"
    path.write_text(
        "profile_id,email,address\np1,a@x.io,1 Main St\np2,b@x.io,123 Main St, Apt 4B\n"
    )
    await stream(table, {"p1": "a@x.io", "p2": "b@x.io"})
    await send_all(table)
    report = await reconcile(table, path, "csv")
    assert dict(report.unusable) == {"bad_csv_row": 1}
    assert report.counts[REMOVED] == 0
    assert {p for p, (a, _) in (await desired(table)).items() if a == ADD} == {"p1", "p2"}


async def test_a_stray_quote_that_swallows_later_rows_removes_no_member(
    tmp_path: Path, table: MemberTable
) -> None:
    """`p1,"a@x.io` opens a quoted cell that runs to the end of the file: the rows after it
    are not in the snapshot as read, yet they are members. The row spans several lines: it is
    unusable, names no member that can be read, so nothing is removed."""
    path = tmp_path / "s.csv"
    path.write_text('profile_id,email\np1,"a@x.io\np2,b@x.io\np3,c@x.io\n')
    await stream(table, {"p1": "a@x.io", "p2": "b@x.io", "p3": "c@x.io"})
    await send_all(table)
    report = await reconcile(table, path, "csv")
    assert dict(report.unusable) == {"bad_csv_row": 1}
    assert report.counts[REMOVED] == 0
    assert {p for p, (a, _) in (await desired(table)).items() if a == ADD} == {"p1", "p2", "p3"}


def test_a_quoted_address_over_two_lines_is_one_usable_row(tmp_path: Path) -> None:
    """A spreadsheet's line break inside a quoted address (Alt+Enter) is legal CSV."""
    path = tmp_path / "s.csv"
    path.write_text('profile_id,email,address\np1,a@x.io,"123 Main St\nApt 4B"\np2,b@x.io,\n')
    lines = list(read_snapshot(path, "csv"))
    assert [number for number, _ in lines] == [2, 4]
    assert isinstance(lines[0][1], dict)
    assert lines[0][1]["identifiers"]["address"] == "123 Main St\nApt 4B"


def test_a_csv_cell_past_the_csv_modules_limit_is_a_usage_error_naming_its_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.csv"
    path.write_text("profile_id,email\np1,a@x.io\np2," + "b" * 200_000 + "@x.io\n")
    with pytest.raises(UsageError, match="--snapshot: line 3"):
        list(read_snapshot(path, "csv"))


def test_a_json_lines_snapshot_may_start_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"profile_id": "p1", "identifiers": {"email": "a@x.io"}}\n')
    [(number, fields)] = list(read_snapshot(path, "jsonl"))
    assert number == 1
    assert isinstance(fields, dict)
    assert fields["profile_id"] == "p1"


def test_blank_lines_before_a_csv_header_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("\n  \nprofile_id,email\np1,a@x.io\n")
    [(number, fields)] = list(read_snapshot(path, "csv"))
    assert (number, fields) == (4, {"profile_id": "p1", "identifiers": {"email": "a@x.io"}})


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"\n\n"])
def test_a_csv_snapshot_without_a_header_is_a_usage_error(tmp_path: Path, content: bytes) -> None:
    """Not an empty snapshot (which would remove every member): a CSV needs its header."""
    path = tmp_path / "s.csv"
    path.write_bytes(content)
    with pytest.raises(UsageError, match="profile_id"):
        list(read_snapshot(path, "csv"))


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"\n  \n"])
async def test_an_empty_json_lines_snapshot_is_a_usage_error_and_removes_no_member(
    tmp_path: Path, table: MemberTable, content: bytes
) -> None:
    """A JSON lines file has no header to say it is meant empty: an empty one (an export that
    wrote nothing) is a usage error, as a CSV without its header, not the removal of every
    member."""
    await stream(table, {"p1": "a@x.io", "p2": "b@x.io"})
    assert await send_all(table) == 2
    path = tmp_path / "s.jsonl"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=r"--snapshot: .*empty"):
        await reconcile(table, path, "jsonl")
    assert await table.waiting([AUDIENCE_ID]) == 0


def test_a_csv_header_without_profile_id_or_with_unknown_columns_is_a_usage_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.csv"
    path.write_text("email,country\na@example.com,US\n")
    with pytest.raises(UsageError, match="profile_id"):
        list(read_snapshot(path, "csv"))
    path.write_text("profile_id,mail\np,a@example.com\n")
    with pytest.raises(UsageError, match="mail"):
        list(read_snapshot(path, "csv"))


async def members_recorded(db: Path) -> int:
    """Rows in the member table of the SQLite store at `db`."""
    store = await Store.connect(f"sqlite+aiosqlite:///{db}")
    try:
        async with store._read() as conn:
            return int(await conn.scalar(select(func.count()).select_from(members)) or 0)
    finally:
        await store.close()


def command_config(tmp_path: Path) -> Path:
    """A config for the command itself: an SQLite store in `tmp_path`, the destination vip."""
    path = tmp_path / "syncd.toml"
    path.write_text(
        f'[store]\nurl = "sqlite+aiosqlite:///{tmp_path / "s.db"}"\n\n[[destinations]]\n'
        'audience = "vip"\nconnection_id = "5a523424-e8b3-4da5-9a32-24a861aea576"\n'
        "audience_id = 413642381039213536\n"
    )
    return path


def test_a_csv_without_its_header_is_refused_without_showing_its_first_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A header-less CSV's first row is a member's PII: the error names the unknown columns by
    position, never by their cells."""
    from syncd.cli import main

    config_path = command_config(tmp_path)
    snap = tmp_path / "s.csv"
    snap.write_text("p1,jane.doe@example.com,+12062661000\np2,b@example.com,\n")
    argv = ["reconcile", "--config", str(config_path), "--audience", "vip"]
    assert main([*argv, "--snapshot", str(snap), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--snapshot" in err
    assert "columns 1, 2, 3" in err
    for cell in ("p1", "jane.doe", "2062661000"):
        assert cell not in err


# -- compare rules -------------------------------------------------------------------------------
def held(
    action: str = ADD,
    digest: bytes = b"d1",
    at: float = T0,
    never_sent: bool = False,
    invalid: bool = False,
) -> HeldMember:
    record = orjson.dumps({"externalUserId": "u", "action": "CREATE", "hashedPII": []})
    return HeldMember("u", action, digest, at, 0, never_sent, invalid, record)


def test_compare_rules_for_a_snapshot_member() -> None:
    assert compare_member("u", ADD, b"r", b"d1", held(), AS_OF) == (UNCHANGED, None)
    kind, write = compare_member("u", ADD, b"r", b"d2", held(), AS_OF)
    assert kind == CHANGED
    assert write is not None
    assert write.held == held()
    assert compare_member("u", ADD, b"r", b"d1", held(REMOVE), AS_OF)[0] == ADDED
    assert compare_member("u", ADD, b"r", b"d1", None, AS_OF)[0] == ADDED
    # a change at or after --as-of stands
    assert compare_member("u", ADD, b"r", b"d2", held(at=AS_OF + 1), AS_OF) == (NEWER, None)
    # a remove (strict consent DENIED) of a member removed already: unchanged whatever digest
    assert compare_member("u", REMOVE, b"r", b"d2", held(REMOVE), AS_OF) == (UNCHANGED, None)
    # Removes skip members Amazon was never sent or refused, as for the members it lacks
    assert compare_member("u", REMOVE, b"r", b"d1", held(), AS_OF)[0] == REMOVED
    assert compare_member("u", REMOVE, b"r", b"d1", None, AS_OF) == (WITHDRAWN, None)
    kind, write = compare_member("u", REMOVE, b"r", b"d1", held(never_sent=True), AS_OF)
    assert (kind, write is not None) == (WITHDRAWN, True)  # the row's add withdrawn, unsent
    assert compare_member("u", REMOVE, b"r", b"d1", held(invalid=True), AS_OF) == (INVALID, None)


def test_compare_rules_for_a_member_the_snapshot_lacks() -> None:
    assert compare_absent(held(REMOVE), AS_OF) == (None, None)
    assert compare_absent(held(invalid=True), AS_OF) == ("invalid", None)
    assert compare_absent(held(at=AS_OF), AS_OF) == (NEWER, None)
    kind, write = compare_absent(held(), AS_OF)
    assert kind == REMOVED
    assert write is not None
    assert write.action == REMOVE
    assert orjson.loads(write.record)["action"] == "DELETE"
    assert write.digest == b"d1"
    assert compare_absent(held(never_sent=True), AS_OF)[0] == WITHDRAWN


# -- a whole reconcile ---------------------------------------------------------------------------
def snapshot(tmp: Path, members_: dict[str, str]) -> Path:
    """A JSON lines snapshot of `members_`; none: a CSV file of its header only (an empty JSON
    lines file is refused)."""
    if not members_:
        path = tmp / "snap.csv"
        path.write_text("profile_id,country,email\n")
        return path
    path = tmp / "snap.jsonl"
    path.write_bytes(
        b"".join(
            orjson.dumps({"profile_id": p, "country": "US", "identifiers": {"email": e}}) + b"\n"
            for p, e in sorted(members_.items())
        )
    )
    return path


async def test_mirror_sends_exactly_the_difference_and_the_same_snapshot_again_nothing(
    tmp_path: Path, table: MemberTable
) -> None:
    m = {"keep": "k@x.io", "change": "old@x.io", "drop": "d@x.io"}
    await stream(table, m)
    assert await send_all(table) == 3
    s = {"keep": "k@x.io", "change": "new@x.io", "new": "n@x.io"}
    path = snapshot(tmp_path, s)
    dry = await reconcile(table, path, "jsonl", dry_run=True)
    assert await table.waiting([AUDIENCE_ID]) == 0  # a dry run changes nothing
    report = await reconcile(table, path, "jsonl")
    assert dry.counts == report.counts
    assert (report.counts[ADDED], report.counts[CHANGED], report.counts[REMOVED]) == (1, 1, 1)
    assert report.counts[UNCHANGED] == 1
    assert await table.waiting([AUDIENCE_ID], RECONCILE) == 3
    assert await table.reconcile_progress(AUDIENCE_ID, AS_OF) == (3, 0)
    claims = await table.claim_due([AUDIENCE_ID], 1000, LEASE, "sender")
    assert {(c.external_user_id, c.action) for c in claims} == {
        ("change", ADD),
        ("new", ADD),
        ("drop", REMOVE),
    }
    assert await table.mark_sent(claims, "rec") == []
    await table.apply_job_outcome("rec", "SUCCEEDED")
    assert await table.reconcile_progress(AUDIENCE_ID, AS_OF) == (0, 0)
    again = await reconcile(table, path, "jsonl", as_of=AS_OF + 50)
    assert again.to_send == 0
    assert again.counts[UNCHANGED] == 3
    assert await table.waiting([AUDIENCE_ID]) == 0


async def test_reconcile_work_is_claimed_after_live_changes_and_refreshes(
    tmp_path: Path, table: MemberTable, clock: FakeClock
) -> None:
    await stream(table, {"old": "o@x.io"})
    await send_all(table)
    await reconcile(table, snapshot(tmp_path, {"old": "o@x.io", "r1": "1@x.io"}), "jsonl")
    clock.advance(10)
    assert await table.due_for_refresh(AUDIENCE_ID, 5, 10) == 1  # "old" is due for a refresh
    await stream(table, {"live": "l@x.io"}, at=AS_OF + 10)
    claims = await table.claim_due([AUDIENCE_ID], 1, LEASE, "a")
    claims += await table.claim_due([AUDIENCE_ID], 1, LEASE, "b")
    claims += await table.claim_due([AUDIENCE_ID], 1, LEASE, "c")
    assert [c.external_user_id for c in claims] == ["live", "old", "r1"]
    async with table._store._read() as conn:
        ranks = dict(
            (await conn.execute(select(members.c.external_user_id, members.c.due_rank))).all()
        )
    assert ranks == {"live": 0, "old": BACKGROUND, "r1": RECONCILE}


async def test_a_newer_live_change_wins_and_a_row_changed_since_compared_is_left(
    tmp_path: Path, table: MemberTable
) -> None:
    await stream(table, {"a": "a@x.io", "b": "b@x.io"})
    await send_all(table)
    # "a" changed live after --as-of: the snapshot's older view does not overwrite it
    await stream(table, {"a": "a2@x.io"}, at=AS_OF + 5)
    report = await reconcile(table, snapshot(tmp_path, {"a": "a3@x.io"}), "jsonl")
    assert report.counts[NEWER] == 1
    assert report.counts[REMOVED] == 1
    _record, digest = record_of("a", "a2@x.io")
    assert (await desired(table))["a"] == (ADD, digest)
    # a write whose row changed between compare and write does not apply
    stale = (await table.held_members(AUDIENCE_ID, ["a"]))["a"]
    await stream(table, {"a": "a4@x.io"}, at=AS_OF + 6)
    from syncd.members import ReconcileWrite

    new_record, new_digest = record_of("a", "a5@x.io")
    done = await table.record_reconcile(
        AUDIENCE_ID, [ReconcileWrite("a", ADD, new_record, new_digest, stale)], occurred_at=AS_OF
    )
    assert (done.written, done.changed) == (0, 1)
    assert (await desired(table))["a"] == (ADD, record_of("a", "a4@x.io")[1])


async def test_a_member_never_sent_is_removed_without_a_delete(
    tmp_path: Path, table: MemberTable
) -> None:
    await stream(table, {"pending": "p@x.io"})  # due, never sent
    report = await reconcile(table, snapshot(tmp_path, {}), "csv")
    assert report.counts[WITHDRAWN] == 1
    assert report.to_send == 0
    assert await table.waiting([AUDIENCE_ID]) == 0
    assert (await desired(table))["pending"][0] == REMOVE


async def test_a_member_whose_post_may_have_gone_is_removed_with_a_delete(
    tmp_path: Path, table: MemberTable, clock: FakeClock
) -> None:
    """A sender claimed the member and died with its POST unanswered (it may have reached
    Amazon): no sent state, no job, its claim ran out. Amazon may hold that member, so a snapshot
    that lacks it removes it with a DELETE; a member never claimed is still withdrawn unsent."""
    await stream(table, {"timed-out": "t@x.io"})
    assert len(await table.claim_due([AUDIENCE_ID], 10, LEASE, "sender")) == 1  # POSTed: no answer
    await stream(table, {"unsent": "u@x.io"})
    clock.advance(LEASE + 1)  # the sender died: its lease ran out, nothing stored
    report = await reconcile(table, snapshot(tmp_path, {}), "csv")
    assert (report.counts[REMOVED], report.counts[WITHDRAWN], report.to_send) == (1, 1, 1)
    claims = await table.claim_due([AUDIENCE_ID], 10, LEASE, "sender")
    assert [(c.external_user_id, c.action) for c in claims] == [("timed-out", REMOVE)]
    assert (await desired(table))["unsent"][0] == REMOVE


emails = st.sampled_from(["a@x.io", "b@x.io", "c@x.io"])
profiles = st.dictionaries(st.sampled_from([f"p{i}" for i in range(12)]), emails, max_size=12)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(m=profiles, s=profiles, sent=st.booleans())
async def test_for_any_table_and_snapshot_the_desired_state_is_the_snapshot(
    tmp_path_factory: pytest.TempPathFactory,
    m: dict[str, str],
    s: dict[str, str],
    sent: bool,
) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    store = await Store.connect(f"sqlite+aiosqlite:///{tmp / 'syncd.db'}", clock=FakeClock())
    await store.ensure_schema(auto_upgrade=True)
    try:
        t = MemberTable(store)
        if m:
            await stream(t, m)
            if sent:
                await send_all(t)
        path = snapshot(tmp, s)
        report = await reconcile(t, path, snapshot_format(path, None))
        want = {p: (ADD, record_of(p, e)[1]) for p, e in s.items()}
        got = {p: v for p, v in (await desired(t)).items() if v[0] == ADD}
        assert got == want
        changed = sum(1 for p in s.keys() & m.keys() if s[p] != m[p])
        if sent:  # everything of M reached Amazon: the difference, exactly, is sent
            assert report.to_send == len(s.keys() - m.keys()) + len(m.keys() - s.keys()) + changed
        again = await reconcile(t, path, snapshot_format(path, None), as_of=AS_OF + 1)
        assert again.to_send == 0
        assert again.counts[UNCHANGED] == len(s)
    finally:
        await store.close()


# -- --wait --------------------------------------------------------------------------------------
async def test_wait_exits_1_with_the_count_when_amazon_refused_some(
    tmp_path: Path, table: MemberTable
) -> None:
    first = await reconcile(table, snapshot(tmp_path, {"good": "g@x.io", "bad": "b@x.io"}), "jsonl")
    claims = await table.claim_due([AUDIENCE_ID], 10, LEASE, "sender")
    assert await table.mark_sent(claims, "job") == []
    await table.apply_job_outcome("job", "PARTIALLYSUCCEEDED", {"bad": "invalid_pii"})
    out = io.StringIO()
    assert await wait_for_amazon(table, DEST, 30.0, out, first) == 1
    assert "refused by Amazon: 1" in out.getvalue()
    # A later reconcile: a member of its snapshot that Amazon refused as it stands is still
    # refused (exit 1); one its snapshot no longer names is not its concern (exit 0).
    s = {"good": "g@x.io", "bad": "b@x.io", "new": "n@x.io"}
    again = await reconcile(table, snapshot(tmp_path, s), "jsonl", as_of=AS_OF + 50)
    assert again.refused_before == 1
    await send_all(table, "job-2")
    out = io.StringIO()
    assert await wait_for_amazon(table, DEST, 30.0, out, again) == 1
    assert "refused by Amazon: 1" in out.getvalue()
    s = {"good": "g@x.io", "new": "n@x.io", "other": "o@x.io"}
    last = await reconcile(table, snapshot(tmp_path, s), "jsonl", as_of=AS_OF + 60)
    assert last.refused_before == 0
    await send_all(table, "job-3")
    out = io.StringIO()
    assert await wait_for_amazon(table, DEST, 30.0, out, last) == 0


async def test_wait_exits_0_once_amazon_accepted_all_of_it(
    tmp_path: Path, table: MemberTable
) -> None:
    report = await reconcile(table, snapshot(tmp_path, {"a": "a@x.io", "b": "b@x.io"}), "jsonl")
    assert await table.reconcile_progress(AUDIENCE_ID, AS_OF) == (2, 0)
    await send_all(table)
    out = io.StringIO()
    assert await wait_for_amazon(table, DEST, 30.0, out, report) == 0
    assert "Amazon accepted all of it" in out.getvalue()


async def test_wait_says_when_nothing_is_sending_and_gives_up_at_the_timeout(
    tmp_path: Path, table: MemberTable
) -> None:
    report = await reconcile(table, snapshot(tmp_path, {"a": "a@x.io", "b": "b@x.io"}), "jsonl")
    out = io.StringIO()
    assert await wait_for_amazon(table, DEST, 2.5, out, report) == 1
    text = out.getvalue()
    assert "nothing is sending" in text
    assert "timed out: 2 of 2 not accepted yet" in text


async def test_a_reconcile_cut_short_and_run_again_does_the_rest(
    tmp_path: Path, table: MemberTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconcile_mod, "CHUNK_LINES", 4)
    monkeypatch.setattr(reconcile_mod, "WRITE_BATCH", 4)
    m = {f"m{i:02}": f"m{i}@x.io" for i in range(20)}
    await stream(table, m)
    await send_all(table)
    s = {f"m{i:02}": f"m{i}@x.io" for i in range(10)} | {
        f"n{i:02}": f"n{i}@x.io" for i in range(20)
    }
    path = snapshot(tmp_path, s)

    def cut_short(after: int) -> Any:
        for n, item in enumerate(read_snapshot(path, "jsonl")):
            if n == after:
                raise KeyboardInterrupt
            yield item

    reconciler = Reconciler(CFG, DEST, table, as_of=AS_OF, dry_run=False, workers=0)
    with pytest.raises(KeyboardInterrupt):
        await reconciler.run(cut_short(26))
    partial = await table.waiting([AUDIENCE_ID], RECONCILE)
    assert 0 < partial < 30  # some recorded, not all
    report = await reconcile(table, path, "jsonl", as_of=AS_OF + 1)
    # the rest, not again what was recorded (the first run got to no remove)
    assert report.counts[ADDED] == 20 - partial
    assert report.counts[UNCHANGED] == 10 + partial
    assert report.counts[REMOVED] == 10
    want = {p: (ADD, record_of(p, e)[1]) for p, e in s.items()}
    assert {p: v for p, v in (await desired(table)).items() if v[0] == ADD} == want
    assert await table.waiting([AUDIENCE_ID], RECONCILE) == 30  # 20 adds, 10 removes
    again = await reconcile(table, path, "jsonl", as_of=AS_OF + 2)
    assert again.to_send == 0


def test_the_budget_estimate_counts_what_waits_beyond_the_window() -> None:
    view = BudgetView(waiting=1100, remaining=100, per_hour=3600, window_s=3600.0)
    assert view.seconds(1100) == 1000.0  # 100 fit now, 1,000 more at one a second
    assert view.seconds(50) == 0.0
    report = Report()
    report.counts[ADDED] = 1000
    report.bad(7, "bad_country")
    text = summary(report, DEST, view, dry_run=False)
    assert "adds       1000" in text
    assert "bad_country: 1 (lines 7)" in text
    assert "records to send: 1000; waiting on connection" in text
    assert "1100 in all" in text
    assert "about 17 min until the budget has let it all through" in text
    fits = BudgetView(waiting=10, remaining=5000, per_hour=3600, window_s=3600.0)
    assert "it all fits now" in summary(report, DEST, fits, dry_run=True)


async def test_a_parquet_snapshot_with_integer_columns_reads_as_text(
    tmp_path: Path, table: MemberTable
) -> None:
    path = tmp_path / "s.parquet"
    pq.write_table(
        pa.table(
            {"profile_id": [1001, 1002], "phone": [12062661000, None], "email": [None, "b@x.io"]}
        ),
        path,
    )
    lines = list(read_snapshot(path, "parquet"))
    assert lines == [
        (1, {"profile_id": "1001", "identifiers": {"phone": "12062661000"}}),
        (2, {"profile_id": "1002", "identifiers": {"email": "b@x.io"}}),
    ]
    report = await reconcile(table, path, "parquet")
    assert report.counts[ADDED] == 2
    assert not report.unusable


def test_parquet_floats_and_lists_read_as_a_csv_would_hold_them(tmp_path: Path) -> None:
    """A whole float is its digits (a profile id 1.0 is the member "1" that events name); a
    list is several values."""
    path = tmp_path / "s.parquet"
    pq.write_table(
        pa.table(
            {
                "profile_id": [1.0, 2.0],
                "phone": [12062661000.0, None],
                "postal_code": [2134.0, 98101.0],
                "email": [["a@x.io", "b@x.io"], None],
            }
        ),
        path,
    )
    assert list(read_snapshot(path, "parquet")) == [
        (
            1,
            {
                "profile_id": "1",
                "identifiers": {
                    "phone": "12062661000",
                    "postal_code": "2134",
                    "email": ["a@x.io", "b@x.io"],
                },
            },
        ),
        (2, {"profile_id": "2", "identifiers": {"postal_code": "98101"}}),
    ]


@pytest.mark.parametrize("content", [b"", b"garbage", b"PAR1" + b"\0" * 64 + b"PAR1"])
def test_a_file_that_is_not_parquet_is_a_usage_error_naming_the_snapshot(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "s.parquet"
    path.write_bytes(content)
    with pytest.raises(UsageError, match="--snapshot"):
        list(read_snapshot(path, "parquet"))


def test_usage_errors_exit_2_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from syncd.cli import main

    config_path = command_config(tmp_path)
    snap = tmp_path / "s.csv"
    snap.write_text("profile_id,email\np,a@x.io\n")
    base = ["reconcile", "--config", str(config_path), "--snapshot", str(snap)]
    cases = {
        "--audience": [*base, "--audience", "nope"],
        "--snapshot": [
            "reconcile",
            "--config",
            str(config_path),
            "--audience",
            "vip",
            "--snapshot",
            str(tmp_path / "missing.csv"),
        ],
        "--timeout": [*base, "--audience", "vip", "--timeout", "5"],
        "--wait": [*base, "--audience", "vip", "--wait", "--dry-run"],
        "--as-of": [*base, "--audience", "vip", "--as-of", "yesterday"],
        "--format": [*base, "--audience", "vip", "--format", "xml"],
    }
    for flag, argv in cases.items():
        assert main(argv) == 2, flag
        assert flag in capsys.readouterr().err


async def test_the_budget_view_counts_a_post_in_flight_as_the_daemon_does(
    store: Store, clock: FakeClock
) -> None:
    """A POST retrying longer than two windows still counts for the daemon (its hold): the
    view reconcile plans with must count it too, not show budget the daemon will not spend."""
    cfg = config(budget={"window_seconds": 60})
    hold_s = cfg.amazon.max_retry_time_s + cfg.amazon.request_timeout_s
    rid, _ = await store.reserve(
        DEST.connection_id, 1000, cfg.budget.records_per_hour, 60, hold_s=hold_s
    )
    assert rid is not None
    clock.advance(200)  # three windows on, the POST still retrying: unconfirmed
    view = await budget_view(cfg, DEST, MemberTable(store), store)
    assert view.remaining == cfg.budget.records_per_hour - 1000


async def test_a_member_erased_after_the_as_of_is_reported_erased_not_added(
    tmp_path: Path, table: MemberTable
) -> None:
    """The snapshot names a profile erased after --as-of: nothing is recorded for it, and the
    summary says so: not an add, not a record to send (each run of the same snapshot alike)."""
    path = tmp_path / "s.csv"
    path.write_text("profile_id,email\np1,a@x.io\np2,b@x.io\n")
    await stream(table, {"p1": "a@x.io"})
    await send_all(table)
    await table.erase(["p2"], [AUDIENCE_ID], occurred_at=AS_OF + 5, position=0)
    for _ in range(2):
        report = await reconcile(table, path, "csv")
        assert (report.counts[ADDED], report.erased, report.to_send) == (0, 1, 0)
        assert report.counts[UNCHANGED] == 1


async def test_a_dry_run_counts_a_member_erased_after_the_as_of_as_the_real_run_does(
    tmp_path: Path, table: MemberTable
) -> None:
    """A dry run reports what the real run would record: a member erased at or after --as-of
    whose erase Amazon confirmed (its tombstone alone is left: p3) is counted erased, not an
    add; one whose erase's DELETE still waits (p2) holds a change newer than --as-of."""
    path = tmp_path / "s.csv"
    path.write_text("profile_id,email\np1,a@x.io\np2,b@x.io\np3,c@x.io\n")
    await stream(table, {"p1": "a@x.io", "p2": "b@x.io", "p3": "c@x.io"})
    await send_all(table)
    await table.erase(["p3"], [AUDIENCE_ID], occurred_at=AS_OF + 5, position=0)
    assert await send_all(table, "erase") == 1
    assert await table.member(AUDIENCE_ID, "p3") is None
    await table.erase(["p2"], [AUDIENCE_ID], occurred_at=AS_OF + 5, position=0)
    dry = await reconcile(table, path, "csv", dry_run=True)
    assert await table.waiting([AUDIENCE_ID], RECONCILE) == 0  # a dry run changes nothing
    report = await reconcile(table, path, "csv")
    assert (report.counts[ADDED], report.counts[NEWER], report.erased) == (0, 1, 1)
    assert report.to_send == 0
    assert (dry.counts, dry.erased, dry.to_send) == (report.counts, report.erased, 0)


async def test_a_live_change_older_than_a_complete_reconcile_changes_nothing(
    tmp_path: Path, table: MemberTable
) -> None:
    """A snapshot says what the audience holds at --as-of (given: its export time), members it
    found unchanged included (no row written for them): a live change older than that, read
    later, is superseded; a newer one applies. A snapshot with an unusable line says nothing of
    that line's member, and a run without --as-of knows only when it started, not what the
    snapshot saw: then older live changes apply as before."""
    await stream(table, {"p1": "a@x.io", "p2": "b@x.io"})
    await send_all(table)
    path = tmp_path / "s.csv"
    path.write_text("profile_id,email\np1,a@x.io\np2,b@x.io\n")
    await reconcile(table, path, "csv", as_of=AS_OF - 20)  # no --as-of: nothing superseded
    await stream(table, {"p2": "b2@x.io"}, at=AS_OF - 30)
    assert await send_all(table) == 1
    path.write_text("profile_id,email\np1,a@x.io\np2,b2@x.io\n")
    report = await reconcile(table, path, "csv", as_of_given=True)
    assert report.counts[UNCHANGED] == 2
    await stream(table, {"p1": "late@x.io"}, at=AS_OF - 10)  # older than the snapshot
    await stream(table, {"p2": "new@x.io"}, at=AS_OF + 1)  # newer
    assert await send_all(table) == 1  # p2's change alone
    p1 = await table.member(AUDIENCE_ID, "p1")
    assert p1 is not None
    assert p1.occurred_at == T0  # untouched by the older change

    path.write_text("profile_id,email\np1,a@x.io\np2,new@x.io\np3,not-an-email\n")
    await reconcile(table, path, "csv", as_of=AS_OF + 50, as_of_given=True)  # p3's unusable
    await stream(table, {"p3": "c@x.io"}, at=AS_OF + 20)  # older than this one, newer than the last
    assert await send_all(table) == 1


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00+01:00", "1969-12-31T23:59:59Z"])
def test_an_as_of_before_1970_is_a_usage_error_naming_the_flag(text: str) -> None:
    """No snapshot predates the epoch; year 1 an hour east of UTC was a traceback later (its
    time could not be printed)."""
    with pytest.raises(UsageError, match="--as-of"):
        reconcile_mod._as_of(text)


def test_a_snapshot_that_is_not_a_file_is_named_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory given as --snapshot exists: "no such file" would send the operator looking
    for a typo."""
    from syncd.cli import main

    argv = ["reconcile", "--config", str(command_config(tmp_path)), "--audience", "vip"]
    assert main([*argv, "--snapshot", str(tmp_path)]) == 2
    assert f"--snapshot: not a regular file: {tmp_path}" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_snapshot_that_cannot_be_read_is_a_usage_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    """A regular file whose read fails (here an I/O error; for an operator, mostly a file
    another user owns: permission denied) was a traceback. /proc/self/mem is a regular file
    whose first bytes cannot be read."""
    from syncd.cli import main

    argv = ["reconcile", "--config", str(command_config(tmp_path)), "--audience", "vip"]
    assert main([*argv, "--snapshot", "/proc/self/mem", "--format", fmt]) == 2
    err = capsys.readouterr().err
    assert "--snapshot: cannot read /proc/self/mem" in err
    assert "Input/output error" in err


def test_a_nan_in_a_parquet_float_column_is_an_empty_cell(tmp_path: Path) -> None:
    """A float column's NaN (how some writers keep a missing value) is no value: it was the
    text "nan", so every row without a profile id became the member "nan"."""
    path = tmp_path / "s.parquet"
    nan = float("nan")
    pq.write_table(
        pa.table({"profile_id": [nan, 2.0], "phone": [12062661000.0, nan], "email": ["a", "b"]}),
        path,
    )
    assert list(read_snapshot(path, "parquet")) == [
        (1, {"profile_id": None, "identifiers": {"phone": "12062661000", "email": "a"}}),
        (2, {"profile_id": "2", "identifiers": {"email": "b"}}),
    ]


@pytest.mark.parametrize(
    ("column", "kind"),
    [
        (pa.array([True]), "bool"),
        (pa.array([{"k": "a@x.io"}]), "struct"),
        (pa.array([[["a@x.io"]]]), "list<element: list"),
        (pa.array([946684800], pa.timestamp("s")), "timestamp"),
        (pa.array([1], pa.date32()), "date32"),
    ],
)
def test_a_parquet_column_of_a_type_no_identifier_has_is_a_usage_error_naming_it(
    tmp_path: Path, column: pa.Array, kind: str
) -> None:
    """A cell is text, a number or a list of them; anything else (a bool, a struct, a date) was
    sent as Python's text of it ("True", "{'k': 'a@x.io'}", "1970-01-02": a phone of digits)."""
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"profile_id": ["p1"], "email": ["a@x.io"], "phone": column}), path)
    with pytest.raises(UsageError, match="--snapshot") as info:
        list(read_snapshot(path, "parquet"))
    assert "'phone'" in str(info.value)
    assert kind in str(info.value)


def test_text_columns_of_any_arrow_encoding_read_as_text(tmp_path: Path) -> None:
    """Dictionary-encoded (pandas' categories), large and binary text columns, decimals of
    whole numbers (a warehouse's NUMBER) and all-null columns are text, as before."""
    import decimal

    path = tmp_path / "s.parquet"
    table = pa.table(
        {
            "profile_id": pa.array(["p1"]).dictionary_encode(),
            "email": pa.array(["a@x.io"], pa.large_string()),
            "city": pa.array([b"Seattle"], pa.binary()),
            "phone": pa.array([decimal.Decimal(12062661000)], pa.decimal128(38, 0)),
            "state": pa.array([None], pa.null()),
            "first_name": pa.array([["Jane"]], pa.large_list(pa.string())),
        }
    )
    pq.write_table(table, path)
    assert list(read_snapshot(path, "parquet")) == [
        (
            1,
            {
                "profile_id": "p1",
                "identifiers": {
                    "email": "a@x.io",
                    "city": "Seattle",
                    "phone": "12062661000",
                    "first_name": ["Jane"],
                },
            },
        )
    ]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_column_named_twice_is_a_usage_error_naming_it(tmp_path: Path, fmt: str) -> None:
    """Which of the two would count? A CSV row took the last one (the first email was
    dropped without a word); Parquet failed with a traceback (KeyError)."""
    path = tmp_path / f"s.{fmt}"
    if fmt == "csv":
        path.write_text("profile_id,email,email\np1,a@x.io,b@x.io\n")
    else:
        names = ["profile_id", "email", "email"]
        arrays = [pa.array(["p1"]), pa.array(["a@x.io"]), pa.array(["b@x.io"])]
        pq.write_table(pa.Table.from_arrays(arrays, names=names), path)
    with pytest.raises(UsageError, match="--snapshot") as info:
        list(read_snapshot(path, fmt))
    assert "'email'" in str(info.value)
    assert "twice" in str(info.value)


def test_a_read_failing_midway_does_not_say_the_lines_before_it_are_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lines before a read that fails are hashed and recorded a chunk at a time: those of
    the chunks under way are not recorded when it fails. The message said that what they
    changed is recorded, and an operator could take the audience as reconciled that far."""
    from syncd.cli import main

    read_csv = reconcile_mod._read_csv

    def failing_after_its_lines(path: Path) -> Iterator[tuple[int, Any]]:
        yield from read_csv(path)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(reconcile_mod, "_read_csv", failing_after_its_lines)
    snap = tmp_path / "s.csv"
    snap.write_text("profile_id,email\np1,a@example.com\np2,b@example.com\np3,c@example.com\n")
    argv = ["reconcile", "--config", str(command_config(tmp_path)), "--audience", "vip"]
    assert main([*argv, "--snapshot", str(snap)]) == 2
    err = capsys.readouterr().err
    assert f"--snapshot: cannot read {snap}: Input/output error after line 4" in err
    assert "is recorded" not in err
    assert "may be recorded" in err

    assert asyncio.run(members_recorded(tmp_path / "s.db")) == 0  # none of the lines before it


def test_a_csv_the_reader_refuses_partway_is_refused_before_anything_is_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cell past the csv module's limit (128 KiB) far into the file refused the snapshot
    after the chunks before it were recorded (adds only): the audience was half reconciled,
    and the operator had to work out which lines were. The file is read through once first:
    refused as a whole, nothing recorded."""
    from syncd.cli import main

    snap = tmp_path / "s.csv"
    good = "".join(f"p{i},u{i}@example.com\n" for i in range(2 * reconcile_mod.CHUNK_LINES))
    snap.write_text(f'profile_id,email\n{good}pbig,"{"x" * 200_000}"\n')
    argv = ["reconcile", "--config", str(command_config(tmp_path)), "--audience", "vip"]
    assert main([*argv, "--snapshot", str(snap)]) == 2
    err = capsys.readouterr().err
    assert f"--snapshot: line {2 * reconcile_mod.CHUNK_LINES + 2}: field larger than" in err
    assert "nothing is recorded" in err

    assert asyncio.run(members_recorded(tmp_path / "s.db")) == 0
