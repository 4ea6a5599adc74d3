"""The daemon's HTTP endpoints: `/metrics` (Prometheus text), `/livez`, `/readyz`.

`/livez` answers from the event loop itself, so a blocked loop fails it. `/readyz` is 200 only
when every readiness check is true and 503 otherwise; its JSON body names each check. The
`syncd_ready` gauge is the same verdict, taken at each scrape.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from syncd.errors import ListenError, SyncdError
from syncd.observability.metrics import READY, REGISTRY

Readiness = Callable[[], dict[str, bool]]


def is_ready(checks: dict[str, bool]) -> bool:
    return bool(checks) and all(checks.values())


def create_app(readiness: Readiness) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        READY.set(1 if is_ready(readiness()) else 0)
        response = web.Response(body=generate_latest(REGISTRY))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def livez(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        checks = readiness()
        status = 200 if is_ready(checks) else 503
        return web.Response(
            status=status, body=orjson.dumps(checks), content_type="application/json"
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    return app


async def start_http(address: tuple[str, int], readiness: Readiness) -> web.AppRunner:
    """Serve the endpoints on (host, port); port 0 picks a free port (see `bound_port`)."""
    host, port = address
    runner = web.AppRunner(create_app(readiness), access_log=None)
    await runner.setup()
    try:
        await listen(runner, host, port)
    except ListenError as exc:
        await runner.cleanup()
        raise SyncdError(f"config key 'http.listen': {exc}") from None
    return runner


async def listen(runner: web.AppRunner, host: str, port: int) -> None:
    """Start serving `runner` on host:port, or raise ListenError saying why it cannot."""
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port the runner's first site is bound to."""
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("the HTTP server is not listening")
