from __future__ import annotations

import aiohttp

from syncd.config import HttpConfig
from syncd.observability.http import bound_port, start_http


async def test_endpoints_report_liveness_readiness_and_metrics() -> None:
    checks = {"partitions_assigned": True, "store": False}
    runner = await start_http(HttpConfig(listen="127.0.0.1:0").address, lambda: dict(checks))
    base = f"http://127.0.0.1:{bound_port(runner)}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/livez") as r:
                assert r.status == 200
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 503
                assert await r.json() == checks
            async with http.get(f"{base}/metrics") as r:
                assert "\nsyncd_ready 0.0\n" in await r.text()
            checks["store"] = True
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 200
            async with http.get(f"{base}/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                assert "\nsyncd_ready 1.0\n" in await r.text()
    finally:
        await runner.cleanup()


def test_listen_address_strips_ipv6_brackets() -> None:
    assert HttpConfig(listen="[::]:9108").address == ("::", 9108)
    assert HttpConfig(listen="0.0.0.0:80").address == ("0.0.0.0", 80)
