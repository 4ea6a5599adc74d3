"""The console script as users run it: check-config, db upgrade, jobs, run on an outdated
schema, and the demo."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from syncd.localstack import (
    daemon_config,
    free_port,
    postgres_url,
    provide,
    running_sandbox,
    to_toml,
)
from syncd.store import NewJob, Store
from syncd.store.commands import upgrade_store
from syncd.store.store import SCHEMA_REVISION
from tests.fixtures.postgres import new_database
from tests.fixtures.store import migrate

pytestmark = pytest.mark.integration


def syncd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_config(tmp_path: Path, **sections: dict[str, object]) -> Path:
    raw = daemon_config(
        bootstrap="127.0.0.1:1",
        topic="t",
        sandbox_url="http://127.0.0.1:1",
        token_url="http://127.0.0.1:1/auth/o2/token",
        store_url=f"sqlite+aiosqlite:///{tmp_path / 'syncd.db'}",
        **sections,
    )
    path = tmp_path / "syncd.toml"
    path.write_text(to_toml(raw))
    return path


def test_check_config_prints_the_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    done = syncd("check-config", "--config", str(write_config(tmp_path)))
    assert done.returncode == 0, done.stderr
    effective = orjson.loads(done.stdout)
    assert effective["batch"]["max_records"] == 6000
    assert effective["amazon"]["client_secret"] == "***"
    assert "sandbox-client-secret" not in done.stdout
    assert "sandbox-refresh-token" not in done.stdout


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+asyncpg://syncd:hunter2@db:5432/syncd?password=s3kr1t",
        "postgresql+asyncpg://syncd@db/syncd?ssl=verify-full&password=s3kr1t&command_timeout=30",
    ],
    ids=["password", "query password"],
)
def test_check_config_shows_no_store_url_secret(tmp_path: Path, url: str) -> None:
    """Secrets in the store URL (userinfo or password-like parameters) never reach the output,
    nor an error about the URL."""
    done = syncd("check-config", "--config", str(write_config(tmp_path, store={"url": url})))
    assert done.returncode == 0, done.stderr
    shown = orjson.loads(done.stdout)["store"]["url"]
    assert "s3kr1t" not in done.stdout + done.stderr
    assert shown.startswith("postgresql+asyncpg://syncd")
    assert "password=***" in shown
    refused = syncd("check-config", "--config", str(write_config(tmp_path, store={"url": [url]})))
    assert refused.returncode == 2
    assert "store.url" in refused.stderr
    assert "s3kr1t" not in refused.stdout + refused.stderr


@pytest.mark.parametrize(
    ("section", "key", "named"),
    [("amazon", "client_secret", "amazon.client_secret"), (None, "destinations", "destinations")],
)
def test_check_config_refuses_what_run_refuses(
    tmp_path: Path, section: str | None, key: str, named: str
) -> None:
    """A config `syncd run` cannot start with (no credentials, no destination) does not pass
    the check: exit 2, naming the key, as `run` does."""
    raw = orjson.loads(
        orjson.dumps(
            daemon_config(
                bootstrap="127.0.0.1:1",
                topic="t",
                sandbox_url="http://127.0.0.1:1",
                token_url="http://127.0.0.1:1/auth/o2/token",
                store_url=f"sqlite+aiosqlite:///{tmp_path / 'syncd.db'}",
            )
        )
    )
    del (raw[section] if section else raw)[key]
    path = tmp_path / "syncd.toml"
    path.write_text(to_toml(raw))
    for command in ("check-config", "run"):
        done = syncd(command, "--config", str(path))
        assert done.returncode == 2, (command, done.stderr)
        assert named in done.stderr


def test_check_config_names_a_bad_key_and_exits_2(tmp_path: Path) -> None:
    done = syncd("check-config", "--config", str(write_config(tmp_path, batch={"max_rec": 5})))
    assert done.returncode == 2
    assert "batch.max_rec" in done.stderr


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [
        (["members", "purge", "--yes", "--config"], "--audience-id", "99999999999999999999"),
        (["members", "purge", "--yes", "--config"], "--audience-id", str(2**63)),
        (["audiences", "get", "--config"], "audience_id", "99999999999999999999"),
        (["audiences", "update", "--ttl", "5", "--config"], "audience_id", str(2**63)),
        (["audiences", "create", "--name", "n", "--config"], "--advertiser-id", str(2**63)),
        (
            ["reconcile", "--audience", "a", "--snapshot", "s", "--wait", "--config"],
            "--timeout",
            "nan",
        ),
        (
            ["reconcile", "--audience", "a", "--snapshot", "s", "--wait", "--config"],
            "--timeout",
            "inf",
        ),
        (["sandbox", "--host"], "--port", "99999"),
    ],
)
def test_numeric_flags_out_of_range_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], flag: str, value: str
) -> None:
    """An id past a signed 64-bit integer (what the config's audience_id allows), a timeout
    that is not a finite number or a port past 65535 is exit 2 naming the flag: purge raised
    OverflowError, so did sandbox --port."""
    from syncd import cli

    argv = [*command, str(write_config(tmp_path)) if command[-1] == "--config" else "127.0.0.1"]
    argv += [value] if not flag.startswith("--") else [flag, value]
    assert cli.main(argv) == 2
    assert flag.replace("_", "-") in capsys.readouterr().err.replace("_", "-")


def assert_run_creates_the_schema(config: Path, db: Path) -> None:
    """`syncd run` on `config` brings the store at `db` to the newest revision, and says so
    (then stops, on SIGTERM or for want of Amazon, unreachable here)."""
    log_path = db.parent / "run.log"

    async def schema() -> tuple[str | None, str]:
        store = await Store.connect(f"sqlite+aiosqlite:///{db}")
        try:
            return await store.schema_status()
        finally:
            await store.close()

    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "syncd", "run", "--config", str(config)],
            stdout=log_file,  # the log
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while (status := asyncio.run(schema()))[0] != SCHEMA_REVISION:
                if proc.poll() is not None:
                    pytest.fail(f"syncd run exited before the schema: {log_path.read_text()}")
                assert time.monotonic() < deadline, f"no schema after 60 s: {status}"
                time.sleep(0.1)  # the cadence of the poll, not a synchronization
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)  # its exit: Amazon's token cannot be had here
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = log_path.read_text()
    assert "syncd db upgrade" not in log
    assert "the store had no schema: created it" in log


def test_run_creates_an_empty_store_and_refuses_an_outdated_one_until_db_upgrade(
    tmp_path: Path,
) -> None:
    """A first `syncd run` on a new store needs no other command; a store at an older revision
    (older pods may still use it) waits for `syncd db upgrade`."""
    config = write_config(tmp_path, store={"auto_upgrade": False})
    assert_run_creates_the_schema(config, tmp_path / "syncd.db")
    assert "already at revision" in syncd("db", "upgrade", "--config", str(config)).stdout

    async def downgrade() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'syncd.db'}")
        async with engine.begin() as conn:
            await conn.run_sync(migrate(f"{int(SCHEMA_REVISION) - 1:04d}", down=True))
        await engine.dispose()

    asyncio.run(downgrade())
    refused = syncd("run", "--config", str(config))
    assert refused.returncode == 1
    assert "syncd db upgrade" in refused.stderr
    upgraded = syncd("db", "upgrade", "--config", str(config))
    assert upgraded.returncode == 0, upgraded.stderr
    assert "upgraded" in upgraded.stdout
    again = syncd("db", "upgrade", "--config", str(config))
    assert "already at revision" in again.stdout


def test_db_upgrade_on_a_store_a_newer_release_migrated_is_a_one_line_error(
    tmp_path: Path,
) -> None:
    """An older syncd's `db upgrade` on a newer schema says so (as its other commands do) and
    leaves it as it is: alembic's CommandError was a traceback."""
    config = write_config(tmp_path)
    assert syncd("db", "upgrade", "--config", str(config)).returncode == 0
    newer = f"{int(SCHEMA_REVISION) + 1:04d}"
    with sqlite3.connect(tmp_path / "syncd.db") as db:
        db.execute("UPDATE alembic_version SET version_num = ?", (newer,))
    db.close()
    result = syncd("db", "upgrade", "--config", str(config))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"revision {newer}, newer than this syncd's" in line
    with sqlite3.connect(tmp_path / "syncd.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(newer,)]
    db.close()


@pytest.mark.parametrize("profile", ["[/bold]", "[bold]p-1", ":thumbs_up:"])
def test_members_show_prints_a_profile_id_as_given(tmp_path: Path, profile: str) -> None:
    """A profile id (or any stored text) is shown as it is, never read as rich markup or emoji
    codes: a closing tag was a MarkupError traceback, an opening one hid itself."""
    config = write_config(tmp_path)
    assert syncd("db", "upgrade", "--config", str(config)).returncode == 0
    result = syncd(
        "members", "show", "--config", str(config), "--audience", "vip", "--profile", profile
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{profile} in vip" in result.stdout


def test_jobs_lists_tracked_jobs_as_a_table_and_as_json(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert syncd("db", "upgrade", "--config", str(config)).returncode == 0

    async def add_jobs() -> None:
        store = await Store.connect(f"sqlite+aiosqlite:///{tmp_path / 'syncd.db'}")
        try:
            for i in range(3):
                job = NewJob(f"job-{i}", "conn", 413642381039213536, "vip", 100, 60, 40)
                await store.add_job(job, first_poll_after_s=30)
        finally:
            await store.close()

    asyncio.run(add_jobs())
    as_json = syncd("jobs", "--config", str(config), "--json")
    assert as_json.returncode == 0, as_json.stderr
    doc = orjson.loads(as_json.stdout)
    assert doc["counts"] == {"PENDING": 3}
    assert sorted(j["job_request_id"] for j in doc["jobs"]) == ["job-0", "job-1", "job-2"]
    assert {j["audience_id"] for j in doc["jobs"]} == {413642381039213536}
    table = syncd("jobs", "--config", str(config), "--state", "PENDING")
    assert table.returncode == 0, table.stderr
    assert "PENDING" in table.stdout
    assert "job-1" in table.stdout


@pytest.mark.parametrize(
    "command",
    [
        ["jobs"],
        ["db", "upgrade"],
        ["audiences", "status"],
        ["members", "show", "--audience", "vip", "--profile", "p-1"],
        ["reconcile", "--audience", "vip", "--snapshot", "SNAPSHOT"],
        ["run"],
    ],
    ids=lambda c: "-".join(c[:2]),
)
def test_a_store_that_cannot_be_reached_is_a_one_line_error_naming_it(
    tmp_path: Path, command: list[str]
) -> None:
    """A command whose store does not answer (nothing listens at the URL's port) exits 1 with
    one line naming the store (its URL, password masked) and the cause: no traceback."""
    url = f"postgresql+asyncpg://syncd:s3cret@127.0.0.1:{free_port()}/syncd"
    config = write_config(tmp_path, store={"url": url})
    snapshot = tmp_path / "snapshot.jsonl"
    snapshot.write_text('{"profile_id": "p-1", "identifiers": {"email": "a@example.com"}}\n')
    command = [str(snapshot) if arg == "SNAPSHOT" else arg for arg in command]
    result = syncd(*command, "--config", str(config))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("syncd: error: the store (postgresql+asyncpg://syncd:***@127.0.0.1:")
    assert "refused" in line.lower()
    assert "s3cret" not in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["run"],
        ["db", "upgrade"],
        ["members", "purge", "--audience-id", "5555", "--yes"],
        ["reconcile", "--audience", "vip", "--snapshot", "SNAPSHOT"],
    ],
    ids=lambda c: "-".join(c[:2]),
)
def test_a_read_only_store_is_refused_at_once_by_what_writes(
    tmp_path: Path, pg_server: Any, command: list[str]
) -> None:
    """A PostgreSQL store whose transactions are read-only (a hot standby given by mistake, or
    default_transaction_read_only = on for the database or role) is refused up front by every
    command that writes, in one line naming the store and the cause. `syncd run` started,
    reported ready and failed at its first write of an event (exit 1, restarted, again); db
    upgrade, members purge and reconcile ended in a traceback."""
    url = new_database(pg_server)
    asyncio.run(upgrade_store(url))
    pg_server.psql(
        f"ALTER DATABASE {make_url(url).database} SET default_transaction_read_only = on;"
    )
    config = write_config(tmp_path, store={"url": url})
    snapshot = tmp_path / "snapshot.jsonl"
    snapshot.write_text('{"profile_id": "p-1", "identifiers": {"email": "a@example.com"}}\n')
    command = [str(snapshot) if arg == "SNAPSHOT" else arg for arg in command]
    last = store_refusal(syncd(*command, "--config", str(config), timeout=60))
    assert "read-only" in last, last
    assert "default_transaction_read_only" in last, last
    # what only reads works on it
    assert syncd("jobs", "--config", str(config)).returncode == 0


@pytest.mark.parametrize("command", [["run"], ["db", "upgrade"]], ids=lambda c: "-".join(c))
def test_a_database_not_in_utf8_is_refused_at_once_naming_its_encoding(
    tmp_path: Path, pg_server: Any, command: list[str]
) -> None:
    """A LATIN1 (or SQL_ASCII) database takes the schema, then refuses a text of Amazon's
    outside its charset (an error message, a dead letter's detail: SQLSTATE 22P05, not
    transient), which blocked that job's outcome for ever; SQL_ASCII counts VARCHAR lengths in
    bytes. Refused up front, in one line naming the encoding."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    pg_server.psql(
        f"CREATE DATABASE {name} ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C';"
    )
    config = write_config(tmp_path, store={"url": postgres_url(pg_server, name)})
    last = store_refusal(syncd(*command, "--config", str(config), timeout=60))
    assert "LATIN1" in last, last
    assert "UTF8" in last, last


def store_refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The one line of a command that refused its PostgreSQL store (exit 1, no traceback)."""
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("syncd: error: the store (postgresql+asyncpg://"), last
    return last


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_and_summarizes() -> None:
    done = syncd("demo", "--events", "3000", "--no-progress", timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for line in ("events produced", "records sent", "jobs by state", "dead letters", "budget"):
        assert line in done.stdout
    assert "PENDING" not in done.stdout  # the demo waits until every job is terminal
    # it ends with the audiences' status: each audience, its size at Amazon, a match ratio
    status = done.stdout[done.stdout.index("Audiences at Amazon") :]
    for audience in ("vip", "lapsed", "newsletter"):
        assert audience in status
    assert "not_found" not in done.stderr  # the demo's audiences exist at the sandbox
    assert re.search(r"\d+\.\d%", status), status


@contextlib.contextmanager
def port_in_use() -> Iterator[int]:
    """A port of 127.0.0.1 another socket listens on, for the block."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_the_sandbox_on_a_port_in_use_is_a_one_line_error_naming_the_flag() -> None:
    with port_in_use() as port:
        result = syncd("sandbox", "--port", str(port), timeout=30)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"syncd: error: --port {port}: cannot listen on 127.0.0.1:{port}")


async def test_run_with_http_listen_in_use_is_a_one_line_error_naming_the_key(
    tmp_path: Path,
) -> None:
    async with running_sandbox() as sb:
        with port_in_use() as port:
            raw = daemon_config(
                bootstrap="127.0.0.1:1",
                topic="t",
                sandbox_url=sb.url,
                token_url=sb.token_url,
                store_url=f"sqlite+aiosqlite:///{tmp_path / 'syncd.db'}",
                http={"listen": f"127.0.0.1:{port}"},
            )
            provide(sb.state, raw["destinations"])
            config = tmp_path / "syncd.toml"
            config.write_text(to_toml(raw))
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "syncd",
                "run",
                "--config",
                str(config),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    last = stderr.decode().strip().splitlines()[-1]
    assert last.startswith(
        f"syncd: error: config key 'http.listen': cannot listen on 127.0.0.1:{port}"
    )
    assert "Traceback" not in stderr.decode()


def test_members_show_of_a_profile_id_no_event_can_carry_is_a_usage_error(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 in --profile (no event can carry them): exit 2 naming the flag,
    not a traceback when the answer is written as JSON."""
    config = write_config(tmp_path)
    result = syncd(
        "members", "show", "--config", str(config), "--audience", "vip",
        "--profile", "\udcff\udcfe", "--json",
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--profile" in result.stderr
