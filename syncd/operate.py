"""Operator commands over the member table: `syncd audiences status`, `syncd members show` and
`syncd members purge`.

They read the store (purge deletes from it) and, for the audiences' ttl and size, Amazon's
audience metadata with the short retries of the online checks: a read that fails is shown as
unknown with the reason, never an error of the command. Nothing printed holds a record, a hash
of an identifier or a digest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from rich import box
from rich.console import Console
from rich.table import Table

from syncd import config as config_mod
from syncd.amazon.api import as_object, usable_ttl
from syncd.amazon.client import AmazonClient
from syncd.audiences import DEFAULT_TTL_S, METADATA_TIMEOUT_S, SIZE_KINDS
from syncd.cli import data_console
from syncd.config import Config
from syncd.deliver import ADVICE
from syncd.errors import ConfigError, FatalError, UsageError
from syncd.members import ADD, CONFIRMED, FAILED, INVALID, MemberState, MemberTable
from syncd.model import Destination
from syncd.observability import metrics
from syncd.observability.logging import get_logger
from syncd.preflight import check_client_config
from syncd.routing import external_user_id
from syncd.store import JobRow, Store, command_store

T = TypeVar("T")
log = get_logger("syncd.operate")

RECENT_S = 86400.0  # the match ratio covers the jobs that ended within this
MEMBER_STATES = ("member", "pending", "removed", "invalid")  # MemberTable.counts' keys


# -- command line --------------------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    """Register `members show` and `members purge` (`audiences status` is registered in the
    onboarding commands' `audiences` group, through `add_status_parser`)."""
    group = sub.add_parser("members", help="audience members as syncd holds them")
    members = group.add_subparsers(dest="members_command", required=True)
    show = members.add_parser(
        "show",
        help="one member: desired and sent state, job, why it waits, next TTL refresh",
        description="One member of one audience as the store holds it; never hashes or PII.",
    )
    show.add_argument("--config", required=True, help="TOML config file")
    show.add_argument("--audience", required=True, help="the destination's audience key")
    show.add_argument("--profile", required=True, help="the profile id (as events carry it)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=_cmd_show)

    purge = members.add_parser(
        "purge",
        help="drop the member rows of an audience no destination names any more",
        description="Drop the member rows of an audience that no [[destinations]] names. Give "
        "it the config the daemons run with: an audience one of them still serves gets rows "
        "again.",
    )
    purge.add_argument("--config", required=True, help="TOML config file")
    purge.add_argument(
        "--audience-id", required=True, type=config_mod.amazon_id, help="the audience_id"
    )
    purge.add_argument("--yes", action="store_true", help="really delete the rows")
    purge.set_defaults(func=_cmd_purge)


def add_status_parser(audiences: Any) -> None:
    """Register `status` in the `audiences` subcommand group."""
    status = audiences.add_parser(
        "status",
        help="per destination: ttl, Amazon's audience size, members, match ratio of 24 h",
        description="Per destination: ttl and audienceSize from Amazon, members as syncd holds "
        "them, and the match ratio of the last 24 h of jobs.",
    )
    status.add_argument("--config", required=True, help="TOML config file")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_cmd_status)


def _print_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


# -- audience metadata ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Metadata:
    """What an audience's metadata says, each figure None when unknown; `error` says why the
    read failed (then every figure is None)."""

    ttl: float | None = None  # seconds, as syncd run uses it (amazon.api.usable_ttl)
    received: int | None = None  # audienceSize.receivedRecordSize
    matched: int | None = None  # audienceSize.idResolutionCount
    dsp: int | None = None  # audienceSize.dspAudienceSize
    error: str | None = None

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> Metadata:
        metadata = as_object(raw.get("metadata"))
        size = as_object(metadata.get("audienceSize"))
        ttl = metadata.get("ttl")
        return cls(
            ttl=ttl if usable_ttl(ttl) else None,
            received=_count(size.get(SIZE_KINDS["received"])),
            matched=_count(size.get(SIZE_KINDS["matched"])),
            dsp=_count(size.get(SIZE_KINDS["dsp"])),
        )


def _count(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return value if ok else None


async def read_metadata(cfg: Config, audience_ids: Iterable[int]) -> dict[int, Metadata]:
    """Each audience's metadata, read at once, each read bounded; failures become `error`."""
    wanted = sorted(set(audience_ids))
    if not wanted:
        return {}
    try:
        config_mod.require_credentials(cfg)
    except ConfigError as exc:
        return {a: Metadata(error=str(exc)) for a in wanted}
    async with AmazonClient(check_client_config(cfg.amazon)) as client:
        found = await asyncio.gather(*(_read_one(client, a) for a in wanted))
    return dict(zip(wanted, found, strict=True))


async def _read_one(client: AmazonClient, audience_id: int) -> Metadata:
    try:
        async with asyncio.timeout(METADATA_TIMEOUT_S):
            audience = await client.get_audience(audience_id)
    except TimeoutError:
        return Metadata(error=f"no answer within {METADATA_TIMEOUT_S:g} s")
    except Exception as exc:  # any failure is shown, none stops the report
        why = str(exc) if isinstance(exc, FatalError) else (str(exc) or type(exc).__name__)
        return Metadata(error=why[:200])
    return Metadata.of(audience.raw)


# -- syncd audiences status ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AudienceStatus:
    """One destination's figures."""

    destination: Destination
    metadata: Metadata
    received: int  # receivedRecordSize summed over the last 24 h of jobs
    matched: int  # idResolutionCount, the same jobs
    members: dict[str, int]  # MemberTable.counts

    @property
    def match_ratio(self) -> float | None:
        return min(1.0, self.matched / self.received) if self.received else None

    def to_json(self) -> dict[str, Any]:
        return {
            "audience": self.destination.audience,
            "audience_id": self.destination.audience_id,
            "connection_id": self.destination.connection_id,
            "ttl": self.metadata.ttl,
            "received": self.received,
            "matched": self.matched,
            "match_ratio": self.match_ratio,
            "dsp_audience_size": self.metadata.dsp,
            "members": self.members,
            "amazon_received": self.metadata.received,
            "amazon_matched": self.metadata.matched,
            "metadata_error": self.metadata.error,
        }


async def audience_status(
    cfg: Config, store: Store
) -> tuple[list[AudienceStatus], dict[int, dict[str, int]]]:
    """(one status per destination in config order, {audience_id: member counts} of the
    audiences whose rows remain in the store but no destination names)."""
    table = MemberTable(store)
    named = {d.audience_id for d in cfg.destinations}
    metadata = await read_metadata(cfg, named)
    statuses = []
    for dest in cfg.destinations:
        received, matched = await store.recent_matches(dest.audience_id, RECENT_S)
        statuses.append(
            AudienceStatus(
                dest,
                metadata[dest.audience_id],
                received,
                matched,
                await table.counts(dest.audience_id),
            )
        )
    return statuses, await orphaned(table, named)


async def orphaned(table: MemberTable, named: Iterable[int]) -> dict[int, dict[str, int]]:
    """{audience_id: member counts} of the audiences whose rows remain in the store but that
    none of `named` is (a destination removed from the config, or re-pointed elsewhere)."""
    keep = set(named)
    return {a: await table.counts(a) for a in await table.audience_ids() if a not in keep}


def _cmd_status(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    statuses, orphans = asyncio.run(_with_store(cfg, lambda store: audience_status(cfg, store)))
    if args.json:
        _print_json([s.to_json() for s in statuses])
    else:
        print_status(data_console(), statuses)
    if orphans:
        _print_orphans(data_console(stderr=True), orphans, args.config)
    return 0


def print_status(console: Console, statuses: list[AudienceStatus]) -> None:
    """The status tables for people (also the end of `syncd demo`)."""
    amazon = _table(
        "Audiences at Amazon (metadata)", "audience id", "ttl s", "size", "received", "matched"
    )
    for s in statuses:
        md = s.metadata
        amazon.add_row(
            s.destination.audience,
            str(s.destination.audience_id),
            *(_figure(v) for v in (md.ttl, md.dsp, md.received, md.matched)),
        )
    console.print(amazon)
    for s in statuses:
        if s.metadata.error is not None:
            console.print(
                f"{s.destination.audience}: metadata unreadable: {s.metadata.error}", markup=False
            )

    synced = _table(
        "Members in syncd; jobs of the last 24 h", *MEMBER_STATES, "received", "matched", "match"
    )
    for s in statuses:
        ratio = s.match_ratio
        synced.add_row(
            s.destination.audience,
            *(_figure(s.members[k]) for k in MEMBER_STATES),
            _figure(s.received),
            _figure(s.matched),
            "unknown" if ratio is None else f"{ratio:.1%}",
        )
    console.print(synced)


def _print_orphans(console: Console, orphans: dict[int, dict[str, int]], config: str) -> None:
    table = _table("Audiences no destination names any more (their rows stay)", *MEMBER_STATES)
    table.columns[0].header = "audience id"
    for audience_id, counts in orphans.items():
        table.add_row(str(audience_id), *(_figure(counts[k]) for k in MEMBER_STATES))
    console.print(table)
    console.print(
        f"drop their rows with `syncd members purge --config {config} --audience-id N --yes`",
        markup=False,
    )


def _table(title: str, *figures: str) -> Table:
    """A compact table: a left-aligned name column, then right-aligned figures."""
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    table.add_column("audience", no_wrap=True)
    for name in figures:
        table.add_column(name, justify="right", no_wrap=True)
    return table


def _figure(value: float | None) -> str:
    return "unknown" if value is None else f"{value:,}"


# -- syncd members show --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BudgetUse:
    """Records a connection has in its rolling budget window, and its limit; `batch` is the
    most records a batch holds (0: unknown)."""

    used: int
    limit: int
    window_s: int
    batch: int = 0

    @property
    def room(self) -> int:
        return max(0, self.limit - self.used)


def member_report(
    dest: Destination,
    profile_id: str,
    member: MemberState | None,
    erased_at: float | None,
    job: JobRow | None,
    ttl: float | None,
    refresh_at: float,
    now: float,
    budget: BudgetUse | None = None,
    blocked: tuple[str, float] | None = None,
) -> dict[str, Any]:
    """What `members show` prints about one member. `ttl` is the audience's (None: unknown, the
    default applies); `now` decides whether a claim is live; `budget` is the connection's, for
    a member waiting to be claimed; `blocked` the connection's (cause, since) when a sender
    found it blocked. Times are ISO 8601 UTC."""
    hashed_id = external_user_id(profile_id) != profile_id
    doc: dict[str, Any] = {
        "audience": dest.audience,
        "audience_id": dest.audience_id,
        "profile_id": profile_id,
        # the profile id itself, or (when it does not fit Amazon's pattern) its SHA-256, which
        # is not shown: the profile id may be an email, and this command shows no hash
        "external_user_id": profile_id if not hashed_id else None,
        "external_user_id_hashed": hashed_id,
        "state": "erased" if erased_at is not None else "absent",
        "desired": None,
        "sent": None,
        "job": None,
        "outcome": None,
        "waiting": [],
        "ttl": {"seconds": DEFAULT_TTL_S if ttl is None else ttl, "known": ttl is not None},
        "next_refresh_at": None,
        "expires_at": None,
        "erased_at": _iso(erased_at),
    }
    if member is None:
        return doc
    doc["state"] = _state(member)
    doc["desired"] = {"action": member.action, "occurred_at": _iso(member.occurred_at)}
    if member.sent_action is not None:
        doc["sent"] = {
            "action": member.sent_action,
            "sent_at": _iso(member.sent_at),
            "same_as_desired": member.in_sync,
        }
    if member.job_request_id is not None:
        doc["job"] = _job(member.job_request_id, job)
    if member.outcome is not None:
        doc["outcome"] = {
            "outcome": member.outcome,
            "reason": member.reason,
            "accepted_at": _iso(member.accepted_at),
            "failed_attempts": member.attempts,
        }
    doc["waiting"] = _waiting(member, job, now, budget, paused=dest.paused)
    if blocked is not None and member.due_since is not None and not dest.paused:
        cause, since = blocked
        doc["waiting"].insert(
            0,
            f"its connection {dest.connection_id} is blocked ({cause}) since {_iso(since)}: "
            f"{ADVICE.get(cause, 'see the syncd_connection_blocked alert')}; its changes wait "
            "and it resumes by itself once the fault clears",
        )
    effective_ttl = DEFAULT_TTL_S if ttl is None else ttl
    if member.action == ADD and member.outcome == CONFIRMED and member.accepted_at is not None:
        if effective_ttl > 0:
            doc["expires_at"] = _iso(member.accepted_at + effective_ttl)
        if effective_ttl > 0 and refresh_at > 0:
            doc["next_refresh_at"] = _iso(member.accepted_at + refresh_at * effective_ttl)
    return doc


def _state(member: MemberState) -> str:
    """The member's state as MemberTable.counts counts it."""
    if member.due_since is not None or member.job_request_id is not None:
        return "pending"
    if member.outcome is not None and member.outcome != CONFIRMED:  # NULL: as SQL compares
        return "invalid"
    return "member" if member.action == ADD else "removed"


def _job(job_request_id: str, job: JobRow | None) -> dict[str, Any]:
    if job is None:
        return {"job_request_id": job_request_id, "state": "unknown (not in the jobs table)"}
    return {
        "job_request_id": job_request_id,
        "state": job.state,
        "created_at": _iso(job.created_at),
        "polls": job.polls,
        "next_poll_at": None if job.terminal else _iso(job.next_poll_at),
        "terminal_at": _iso(job.terminal_at),
    }


def _waiting(
    member: MemberState,
    job: JobRow | None,
    now: float,
    budget: BudgetUse | None,
    *,
    paused: bool = False,
) -> list[str]:
    """Why the member's desired state is not (yet) what Amazon holds; empty when nothing waits.
    `paused`: the member's destination is paused."""
    why: list[str] = []
    if member.job_request_id is not None:
        state = "pending" if job is None or not job.terminal else f"{job.state}, being applied"
        why.append(f"its job {member.job_request_id} is {state} at Amazon")
        if not member.in_sync:
            why.append("changed since that send: sent again once the job has ended")
    elif member.due_since is not None:
        if member.claimed_until is not None and member.claimed_until > now:
            claimed = f"claimed by {member.claimed_by} until {_iso(member.claimed_until)}"
            if budget is not None and budget.room == 0:  # its sender waits in Budget.acquire
                why.append(f"{claimed}: its batch waits for the connection's budget")
                why.append(_budget_note(budget))
            else:
                why.append(f"{claimed}: sending")
                if budget is not None and budget.room < budget.batch:
                    why.append(
                        f"the connection's budget has room for {budget.room:,} more records "
                        f"({budget.used:,} of {budget.limit:,} in the last {budget.window_s} s): "
                        "a larger batch waits for the window to roll"
                    )
        elif paused:
            why.append(
                f"due since {_iso(member.due_since)}, but its destination is paused "
                "([[destinations]] paused = true): nothing is sent to it until it is unpaused"
            )
        else:
            kind = "a TTL refresh or reconcile change" if member.refresh else "a live change"
            why.append(
                f"due since {_iso(member.due_since)} ({kind}), waiting to be claimed by a sender"
                + (" (live changes go first)" if member.refresh else "")
            )
            if budget is not None:
                why.append(_budget_note(budget))
    elif member.outcome == INVALID:
        why.append(f"Amazon refused it ({member.reason}): not sent again until it changes")
    elif member.outcome == FAILED:
        why.append(
            f"its sends failed {member.attempts} times{_last(member.reason)}: dead-lettered, "
            "not sent again until it changes"
        )
    if member.due_since is not None and member.attempts:
        why.append(f"{member.attempts} failed attempts so far{_last(member.reason)}")
    return why


def _last(reason: str | None) -> str:
    """Amazon's last reason, when it gave one (a FAILED job may carry none)."""
    return f" (last: {reason})" if reason else ""


def _budget_note(budget: BudgetUse) -> str:
    use = f"{budget.used:,} of {budget.limit:,} records in the last {budget.window_s} s"
    if budget.used >= budget.limit:
        return f"the connection's budget is used up ({use}): it waits for the window to roll"
    return f"the connection's budget has room ({use}): it waits behind the backlog"


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def show_member(
    cfg: Config, store: Store, dest: Destination, profile_id: str
) -> dict[str, Any]:
    """`member_report` of the profile in `dest`, from the store and the audience's metadata."""
    table = MemberTable(store)
    euid = external_user_id(profile_id)
    member = await table.member(dest.audience_id, euid)
    erased_at = await table.tombstone(dest.audience_id, euid)
    job = None
    if member is not None and member.job_request_id is not None:
        job = await store.job(member.job_request_id)
    metadata = (await read_metadata(cfg, [dest.audience_id]))[dest.audience_id]
    budget = None
    if member is not None and member.due_since is not None and not dest.paused:
        window_s = cfg.budget.window_seconds
        used = await store.budget_used(dest.connection_id, window_s, cfg.amazon.post_flight_s)
        budget = BudgetUse(used, cfg.budget.records_per_hour, window_s, cfg.batch.max_records)
    blocked = await store.blocked(dest.connection_id) if budget is not None else None
    return member_report(
        dest,
        profile_id,
        member,
        erased_at,
        job,
        metadata.ttl,
        cfg.members.refresh_at,
        await store.now(),
        budget,
        blocked,
    )


def _cmd_show(args: argparse.Namespace) -> int:
    try:
        args.profile.encode()
    except UnicodeEncodeError:  # bytes of another encoding in argv
        raise UsageError("--profile: not valid UTF-8 (no event can carry such an id)") from None
    cfg = config_mod.load(args.config)
    dest = next((d for d in cfg.destinations if d.audience == args.audience), None)
    if dest is None:
        known = ", ".join(repr(d.audience) for d in cfg.destinations) or "none"
        raise UsageError(f"--audience {args.audience!r}: no destination has it (known: {known})")
    doc = asyncio.run(_with_store(cfg, lambda store: show_member(cfg, store, dest, args.profile)))
    if args.json:
        _print_json(doc)
    else:
        _print_member(data_console(), doc)
    return 0


def _print_member(console: Console, doc: dict[str, Any]) -> None:
    table = Table(
        title=f"{doc['profile_id']} in {doc['audience']} (audience {doc['audience_id']})",
        show_header=False,
    )
    table.add_column("", style="bold", no_wrap=True)
    table.add_column("")
    shown_id = doc["external_user_id"] or "the SHA-256 of the profile id (not shown)"
    rows: list[tuple[str, str]] = [("externalUserId", shown_id)]
    rows.append(("state", doc["state"]))
    if doc["desired"]:
        d = doc["desired"]
        rows.append(("syncd wants", f"{d['action']} (change of {d['occurred_at']})"))
    if doc["sent"]:
        s = doc["sent"]
        same = "same as wanted" if s["same_as_desired"] else "differs from what is wanted"
        rows.append(("last sent", f"{s['action']} at {s['sent_at']} ({same})"))
    if doc["job"]:
        j = doc["job"]
        rows.append(("job", f"{j['job_request_id']}: {j['state']}"))
    if doc["outcome"]:
        o = doc["outcome"]
        rows.append(("last outcome", o["outcome"] + (f" ({o['reason']})" if o["reason"] else "")))
        if o["accepted_at"]:
            rows.append(("accepted (TTL clock)", o["accepted_at"]))
    rows += [("waits", w) for w in doc["waiting"]]
    ttl = doc["ttl"]
    rows.append(("audience ttl", f"{ttl['seconds']} s" + ("" if ttl["known"] else " (default)")))
    if doc["next_refresh_at"]:
        rows.append(("next TTL refresh", doc["next_refresh_at"]))
    if doc["expires_at"]:
        rows.append(("expires at Amazon", f"{doc['expires_at']} unless refreshed"))
    if doc["erased_at"]:
        rows.append(("erased", f"tombstone of the erase of {doc['erased_at']}"))
    if doc["state"] == "absent":
        rows.append(("", "syncd holds no row for this member of this audience"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


# -- syncd members purge -------------------------------------------------------------------------
def _cmd_purge(args: argparse.Namespace) -> int:
    audience_id: int = args.audience_id
    if not args.yes:
        raise UsageError(
            f"--yes is required: this deletes every member row of audience_id {audience_id}"
        )
    cfg = config_mod.load(args.config)
    named = [d.audience for d in cfg.destinations if d.audience_id == audience_id]
    if named:
        raise UsageError(
            f"--audience-id {audience_id}: destination {named[0]!r} still names it; "
            "only an audience no destination names can be purged"
        )
    deleted = asyncio.run(
        _with_store(cfg, lambda store: MemberTable(store).purge_audience(audience_id), writes=True)
    )
    print(f"dropped {deleted} member rows of audience_id {audience_id}")
    return 0


# -- syncd run: what an operator needs to know of the table ----------------------------------------
STORE_SIZE_EVERY_S = 60.0


async def report_at_start(destinations: Sequence[Destination], table: MemberTable) -> None:
    """At `syncd run`'s start: paused destinations (syncd_destination_paused) and the audiences
    whose rows remain but no destination names any more (a log line each, with its member
    count, and syncd_orphaned_members). A failure is logged; it never stops the daemon."""
    for dest in destinations:
        metrics.DESTINATION_PAUSED.labels(dest.audience).set(int(dest.paused))
        if dest.paused:
            log.warning(
                "destination paused: its changes are recorded and wait; nothing is sent to it",
                audience=dest.audience,
                audience_id=dest.audience_id,
            )
    try:
        orphans = await orphaned(table, (d.audience_id for d in destinations))
    except Exception as exc:
        log.warning("orphaned audiences not counted", error=repr(exc)[:300])
        return
    for audience_id, counts in orphans.items():
        rows = sum(counts.values())
        metrics.ORPHANED_MEMBERS.labels(str(audience_id)).set(rows)
        log.warning(
            "audience no destination names has member rows; drop them with "
            "`syncd members purge --audience-id N --yes` unless it comes back",
            audience_id=audience_id,
            members=rows,
            **counts,
        )


async def watch_store_size(
    store: Store, stop: asyncio.Event, every_s: float = STORE_SIZE_EVERY_S
) -> None:
    """Export the store's size on disk (syncd_store_bytes) every `every_s` until `stop`."""
    while not stop.is_set():
        try:
            metrics.STORE_BYTES.set(await store.size_bytes())
        except Exception as exc:  # a store outage: /readyz reports it; try again next round
            log.warning("store size not read", error=repr(exc)[:300])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_s)


# -- plumbing ------------------------------------------------------------------------------------
async def _with_store(
    cfg: Config, work: Callable[[Store], Awaitable[T]], *, writes: bool = False
) -> T:
    """`work` on the config's store, whose schema must be current (`syncd db upgrade`), and
    which must take writes if `work` writes."""
    async with command_store(cfg.store.url, cfg.store.statement_timeout_s, writes=writes) as store:
        return await work(store)
