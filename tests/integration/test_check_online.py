"""`syncd check-config --online` as users run it, against the sandbox over HTTP: a good setup
passes and reports each audience's ttl; each setup fault exits 2 naming the item; an Amazon
that cannot be reached exits 1."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from syncd.localstack import free_port, sqlite_daemon_config, to_toml
from syncd.sandbox.server import RunningSandbox

pytestmark = pytest.mark.integration

TTL_S = 86_400


async def check_online(tmp_path: Path, raw: dict[str, Any]) -> tuple[int, str]:
    """Run the command; its stdout must be the effective config alone (logs go to stderr)."""
    path = tmp_path / "syncd.toml"
    path.write_text(to_toml(raw))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "syncd", "check-config", "--online", "--config", str(path)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    assert orjson.loads(stdout)["destinations"]
    return proc.returncode, stderr.decode()


def good_setup(sandbox: RunningSandbox, tmp_path: Path) -> dict[str, Any]:
    """Two destinations on one connection, both audiences created there; terms accepted."""
    state = sandbox.state
    connection_id = state.create_connection({"amcInstanceId": "amcinstance01"})
    destinations = []
    for key in ("vip", "lapsed"):
        audience = state.create_audience(
            {
                "name": f"syncdcheck{key}",
                "targetResource": {"connectionId": connection_id},
                "metadata": {"ttl": TTL_S},
            }
        )
        destinations.append(
            {
                "audience": key,
                "connection_id": connection_id,
                "audience_id": audience["audienceId"],
                "country_code": "US",
            }
        )
    state.terms_accepted = True
    return sqlite_daemon_config("127.0.0.1:1", sandbox, "t", tmp_path, destinations=destinations)


async def test_a_good_setup_passes_and_reports_each_ttl(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    code, stderr = await check_online(tmp_path, good_setup(sandbox, tmp_path))
    assert code == 0, stderr
    assert stderr.count(f"ttl {TTL_S} s") == 2
    assert "FAIL" not in stderr
    # never a records POST
    assert not any("records" in route for route in sandbox.state.stats()["requests"])


async def test_terms_not_accepted_exit_2_naming_the_connection(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    raw = good_setup(sandbox, tmp_path)
    sandbox.state.terms_accepted = False
    code, stderr = await check_online(tmp_path, raw)
    assert code == 2, stderr
    last = stderr.strip().splitlines()[-1]
    assert "terms" in last
    assert raw["destinations"][0]["connection_id"] in last
    assert "syncd terms accept" in last


async def test_a_missing_audience_exits_2_naming_the_destination(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    raw = good_setup(sandbox, tmp_path)
    raw["destinations"][1]["audience_id"] = 123456789
    code, stderr = await check_online(tmp_path, raw)
    assert code == 2, stderr
    last = stderr.strip().splitlines()[-1]
    assert "'lapsed'" in last
    assert "123456789" in last
    assert "404" in last


async def test_a_missing_connection_exits_2_naming_it(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    raw = good_setup(sandbox, tmp_path)
    missing = "0b7e6f52-3c1d-4b8e-9f0a-8d2c4e6a1b3c"
    raw["destinations"][0]["connection_id"] = missing
    code, stderr = await check_online(tmp_path, raw)
    assert code == 2, stderr
    assert f"connection {missing}" in stderr.strip().splitlines()[-1]
    # the audience is tied to the other connection: that is named too
    assert "Amazon ties this audience to connection" in stderr


async def test_refused_credentials_exit_2(sandbox: RunningSandbox, tmp_path: Path) -> None:
    raw = good_setup(sandbox, tmp_path)
    raw["amazon"]["refresh_token"] = "not-the-sandbox-token"
    code, stderr = await check_online(tmp_path, raw)
    assert code == 2, stderr
    assert "amazon credentials" in stderr.strip().splitlines()[-1]
    assert "not-the-sandbox-token" not in stderr


async def test_an_unreachable_amazon_exits_1(sandbox: RunningSandbox, tmp_path: Path) -> None:
    raw = good_setup(sandbox, tmp_path)
    closed = f"http://127.0.0.1:{free_port()}"
    raw["amazon"] |= {"api_url": closed, "token_url": closed + "/auth/o2/token"}
    code, stderr = await check_online(tmp_path, raw)
    assert code == 1, stderr
    assert "could not be checked" in stderr


async def test_odd_audience_metadata_is_reported_as_syncd_reads_it_not_a_traceback(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    """Amazon's answer of an audience is read as `syncd run` reads it: a targetResource that is
    no object names no connection (it was a traceback: AttributeError on str.get); a ttl that
    is not set, or no number of 0..34300800, is reported with the ttl syncd uses instead (it
    printed `ttl None s` or `ttl -5 s` as if it were the ttl)."""
    raw = good_setup(sandbox, tmp_path)
    vip, lapsed = (sandbox.state.audiences[d["audience_id"]] for d in raw["destinations"])
    vip["targetResource"] = "not an object"
    vip["metadata"]["ttl"] = None
    lapsed["metadata"]["ttl"] = -5
    code, stderr = await check_online(tmp_path, raw)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "ttl not set: Amazon's default 34300800 s applies" in stderr
    assert "ttl -5 is no ttl of 0..34300800 s: syncd uses 34300800 s" in stderr
