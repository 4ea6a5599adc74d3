"""The sandbox application: a strict, observable emulator of the Advertiser audiences API, as
aiohttp handlers and middlewares (`create_app`).

It serves the LwA token endpoint and the ten operations syncd uses (docs/sandbox.md) with the same
paths, bodies, status codes and media types; it checks requests with validation.py (Amazon-like 400
`{"message": ...}` naming the problem) and keeps what it knows in state.py. Around that it adds
what tests need: throttling (429 + Retry-After), fault injection (latency, 5xx, dropped
connections, hangs, 429 storms, expired tokens, a revoked refresh token, one status for one
connection's record POSTs for a while, records refused by an externalUserId marker) and the
`/_sandbox` control routes (stats, ledger, log, members, faults, provide, reset).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from syncd.amazon import api
from syncd.sandbox.state import SandboxSettings, SandboxState
from syncd.sandbox.validation import (
    accepts,
    check_audience_id,
    check_create_audience,
    check_create_connection,
    check_records_body,
    check_terms_acceptance,
    check_ttl,
    check_update_audience,
)

CONTROL_PREFIX = "/_sandbox"
API_PREFIX = "/amc/"

SANDBOX_STATE = web.AppKey("sandbox_state", SandboxState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ConnectionDropped(Exception):
    """Raised by the gate after it dropped the connection (reset or timeout fault)."""


def json_response(
    data: Any, status: int = 200, content_type: str = "application/json"
) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=content_type)


def error(
    request: web.Request, status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """Amazon-like error body; the connections API adds a requestId."""
    body: dict[str, str] = {"message": message}
    if request.path.startswith(api.CONNECTIONS_PATH):
        body["requestId"] = str(uuid.uuid4())
    response = json_response(body, status)
    response.headers.update(headers or {})
    return response


def media_type_of(path: str) -> str:
    if path.startswith(api.CONNECTIONS_PATH):  # includes the terms path
        return api.CONNECTIONS_MEDIA_TYPE
    return api.AUDIENCES_MEDIA_TYPE


def ok(request: web.Request, data: Any, status: int = 200) -> web.Response:
    return json_response(data, status, media_type_of(request.path))


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


async def read_json(request: web.Request) -> tuple[Any, web.Response | None]:
    """The parsed body, or an error response when it is not JSON."""
    raw = await request.read()
    if not raw:
        return None, error(request, 400, "request body is required (JSON)")
    try:
        return orjson.loads(raw), None
    except orjson.JSONDecodeError:
        return None, error(request, 400, "request body is not valid JSON")


def route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and log every non-control request; unmatched routes get JSON errors too."""
    state = request.app[SANDBOX_STATE]
    control = request.path.startswith(CONTROL_PREFIX)
    status: int | str = "dropped"
    response: web.StreamResponse
    try:
        response = await handler(request)
        status = response.status
    except web.HTTPException as exc:
        response = error(request, exc.status, f"{exc.reason}: {request.method} {request.path}")
        status = exc.status
    except ConnectionDropped:
        response = web.Response(status=500)  # written to a closed transport: never seen
    if not control:
        retry_after = response.headers.get("Retry-After")
        state.log_request(request.method, route_name(request), request.path, status, retry_after)
    return response


@web.middleware
async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Everything in front of an API operation: poll tracking, faults, auth, client id,
    throttling and media types."""
    if not request.path.startswith(API_PREFIX):
        return await handler(request)
    state = request.app[SANDBOX_STATE]
    job_id = request.match_info.get("jobRequestId") if request.method == "GET" else None
    if job_id:
        state.poll_started(job_id)
    try:
        return await _guarded(request, handler, state)
    finally:
        if job_id:
            state.poll_finished(job_id)


async def _guarded(
    request: web.Request, handler: Handler, state: SandboxState
) -> web.StreamResponse:
    faults = state.faults
    if faults.latency_s > 0:
        await asyncio.sleep(faults.latency_s)
    if state.chance(faults.timeout_rate):
        await state.hang()
        _drop(request)
    if state.chance(faults.reset_rate):
        _drop(request)
    if state.chance(faults.error_rate):
        status = state.fault_rng.choice((500, 502, 503, 504))
        return error(request, status, "injected server error")
    problem = state.check_bearer(request.headers.get("Authorization"))
    if problem:
        return error(request, 401, problem)
    client_id = request.headers.get(api.CLIENT_ID_HEADER, "")
    problem = state.check_client_id(client_id)
    if problem:
        return error(request, 400, problem)
    wait = state.throttle_wait(client_id)
    if wait > 0:
        return error(request, 429, "Too Many Requests", retry_after(wait))
    if faults.connection_status and request.method == "POST" and request.path == api.RECORDS_PATH:
        injected = await _connection_fault(request, state)
        if injected is not None:
            return injected
    media_type = media_type_of(request.path)
    accept = request.headers.get("Accept")
    if accept and not accepts(accept, media_type):
        return error(request, 406, f"Accept must allow {media_type}")
    if request.method in ("POST", "PUT", "PATCH"):
        if "Content-Type" not in request.headers:
            return error(request, 415, f"Content-Type header is required: {media_type}")
        if request.content_type != media_type:
            return error(request, 415, f"Content-Type must be {media_type}")
    return await handler(request)


async def _connection_fault(request: web.Request, state: SandboxState) -> web.Response | None:
    """The injected answer for a record POST to a connection under a connection_status fault."""
    try:
        body = orjson.loads(await request.read())
        connection_id = body["targetResource"]["connectionId"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None  # the handler reports what is wrong with the body
    fault = state.connection_fault(connection_id) if isinstance(connection_id, str) else None
    if fault is None:
        return None
    status, wait = fault
    headers = {"Retry-After": str(math.ceil(wait))} if wait is not None else None
    return error(request, status, f"injected HTTP {status} for this connection", headers)


def _drop(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()
    raise ConnectionDropped


# -- LwA -------------------------------------------------------------------------------------


def lwa_error(code: str, description: str, status: int = 400) -> web.Response:
    return json_response({"error": code, "error_description": description}, status)


async def token(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    s = state.settings
    state.counters["token_requests"] += 1
    if request.content_type != "application/x-www-form-urlencoded":
        return lwa_error("invalid_request", "body must be application/x-www-form-urlencoded")
    form = await request.post()
    fields = {k: form.get(k) for k in ("grant_type", "refresh_token", "client_id", "client_secret")}
    missing = [k for k, v in fields.items() if not v]
    if missing:
        return lwa_error("invalid_request", f"missing parameter(s): {', '.join(missing)}")
    if fields["grant_type"] != "refresh_token":
        return lwa_error("unsupported_grant_type", "only grant_type=refresh_token is supported")
    if fields["client_id"] != s.client_id or fields["client_secret"] != s.client_secret:
        return lwa_error("invalid_client", "Client authentication failed", 401)
    if fields["refresh_token"] != s.refresh_token or state.faults.revoke_refresh_token:
        return lwa_error(
            "invalid_grant", "The request has an invalid grant parameter : refresh_token"
        )
    return json_response(
        {
            "access_token": state.issue_token(),
            "refresh_token": s.refresh_token,
            "token_type": "bearer",
            "expires_in": math.ceil(s.token_ttl_s),
        }
    )


# -- records ---------------------------------------------------------------------------------


async def post_records(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    body, problem = await read_json(request)
    if problem:
        return problem
    message = check_records_body(body, state.settings.max_records)
    if message:
        return error(request, 400, message)
    if body["audienceId"] == state.settings.records_error_for_audience:
        return error(request, 400, f"audienceId {body['audienceId']} is not a valid audience")
    prefix = state.faults.refuse_records_prefix
    if prefix:
        for index, record in enumerate(body["records"]):
            if record["externalUserId"].startswith(prefix):
                return error(request, 400, f"records[{index}].externalUserId is not valid")
    if state.settings.strict_audiences and body["audienceId"] not in state.audiences:
        message = f"audience {body['audienceId']} not found (create it with {api.METADATA_PATH})"
        return error(request, 404, message)
    wait = state.budget_wait(body["targetResource"]["connectionId"], len(body["records"]))
    if wait is not None:
        return error(request, 429, "records per connection per hour exceeded", retry_after(wait))
    return ok(request, {"jobRequestId": state.accept_records(body)}, 202)


async def get_job(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    job_id = request.match_info["jobRequestId"]
    status = state.job_status(job_id)
    if status is None:
        return error(request, 404, f"jobRequestId {job_id[:64]} not found")
    return ok(request, status)


# -- metadata --------------------------------------------------------------------------------


def path_audience_id(request: web.Request) -> int | None:
    raw = request.match_info["audienceId"]
    return int(raw) if raw.isascii() and raw.isdigit() else None


async def create_audience(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    body, problem = await read_json(request)
    if problem:
        return problem
    message = check_create_audience(body)
    if message:
        return error(request, 400, message)
    audience = state.create_audience(body)
    data = {
        "audienceId": audience["audienceId"],
        "externalAudienceId": audience["metadata"]["externalAudienceId"],
    }
    return ok(request, data, 201)


async def get_audience(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    audience_id = path_audience_id(request)
    if audience_id is None:
        return error(request, 400, "audienceId in the path must be an integer")
    audience = state.audience_view(audience_id)
    if audience is None:
        return error(request, 404, f"audience {audience_id} not found")
    return ok(request, audience)


async def update_audience(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    audience_id = path_audience_id(request)
    if audience_id is None:
        return error(request, 400, "audienceId in the path must be an integer")
    body, problem = await read_json(request)
    if problem:
        return problem
    message = check_update_audience(body)
    if message:
        return error(request, 400, message)
    if audience_id not in state.audiences:
        return error(request, 404, f"audience {audience_id} not found")
    state.update_audience(audience_id, body)
    return ok(request, state.audience_view(audience_id))


# -- connections and terms -------------------------------------------------------------------


async def create_connection(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    body, problem = await read_json(request)
    if problem:
        return problem
    message = check_create_connection(body)
    if message:
        return error(request, 400, message)
    return ok(request, {"connectionId": state.create_connection(body)}, 201)


async def list_connections(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    connection_id = request.query.get("connectionId")
    connections = list(state.connections.values())
    if connection_id is not None:
        if connection_id not in state.connections:
            return error(request, 404, f"connection {connection_id[:64]} not found")
        connections = [state.connections[connection_id]]
    elif request.query.get("isDefault", "").lower() == "true":
        connections = [c for c in connections if c["isDefault"]]
    return ok(request, {"connections": connections})


async def delete_connection(request: web.Request) -> web.StreamResponse:
    state = request.app[SANDBOX_STATE]
    connection_id = request.query.get("connectionId")
    if not connection_id:
        message = "connectionId query parameter is required (without it ALL connections go)"
        return error(request, 400, message)
    if state.connections.pop(connection_id, None) is None:
        return error(request, 404, f"connection {connection_id[:64]} not found")
    return web.Response(status=204)


async def get_terms(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    data = {
        "agreementContent": "<h1>Amazon Marketing Cloud Agreement</h1><p>Sandbox terms.</p>",
        "agreementToken": state.terms_token,
        "hasAccepted": state.terms_accepted,
    }
    return ok(request, data)


async def accept_terms(request: web.Request) -> web.StreamResponse:
    state = request.app[SANDBOX_STATE]
    body, problem = await read_json(request)
    if problem:
        return problem
    message = check_terms_acceptance(body, state.terms_token)
    if message:
        return error(request, 400, message)
    state.terms_accepted = True
    return web.Response(status=204)


# -- control ---------------------------------------------------------------------------------


async def control_stats(request: web.Request) -> web.Response:
    return json_response(request.app[SANDBOX_STATE].stats())


async def control_ledger(request: web.Request) -> web.Response:
    connection_id = request.query.get("connectionId")
    if not connection_id:
        return json_response({"message": "connectionId query parameter is required"}, 400)
    return json_response(request.app[SANDBOX_STATE].ledger(connection_id))


async def control_log(request: web.Request) -> web.Response:
    return json_response(list(request.app[SANDBOX_STATE].log))


async def control_faults(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    try:
        faults = orjson.loads(await request.read())
        if not isinstance(faults, dict):
            raise ValueError("faults must be a JSON object")
        state.set_faults(faults)
    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
        return json_response({"message": str(exc)}, 400)
    return json_response(state.faults_view())


async def control_members(request: web.Request) -> web.Response:
    audience_id = path_audience_id(request)
    if audience_id is None:
        return json_response({"message": "audienceId in the path must be an integer"}, 400)
    view = request.app[SANDBOX_STATE].members_view(audience_id)
    if view is None:
        return json_response({"message": f"audience {audience_id} not found"}, 404)
    return json_response(view)


async def control_provide(request: web.Request) -> web.Response:
    """`{"terms_accepted": true, "connections": [id, ...], "audiences": [{"audienceId": n,
    "connectionId": id, "ttl": s}, ...]}`: make these exist as a setup made them (ids a config
    names; what exists stays). Every key is optional."""
    state = request.app[SANDBOX_STATE]
    try:
        body = orjson.loads(await request.read())
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        audiences = body.get("audiences", [])
        connections = body.get("connections", [])
        if not isinstance(audiences, list) or not isinstance(connections, list):
            raise ValueError("audiences and connections must be lists")
        for connection_id in connections:
            if not isinstance(connection_id, str) or not connection_id:
                raise ValueError("a connection id must be a non-empty string")
            state.provide_connection(connection_id)
        for audience in audiences:
            audience_id, connection_id = audience["audienceId"], audience["connectionId"]
            ttl = audience.get("ttl")
            if check_audience_id(audience_id) or not isinstance(connection_id, str):
                raise ValueError("an audience needs an integer audienceId and a connectionId")
            if problem := check_ttl(ttl):
                raise ValueError(problem)
            state.provide_audience(audience_id, connection_id, ttl)
        if body.get("terms_accepted"):
            state.terms_accepted = True
    except (orjson.JSONDecodeError, ValueError, TypeError, KeyError) as exc:
        return json_response({"message": str(exc)}, 400)
    return json_response(
        {
            "terms_accepted": state.terms_accepted,
            "connections": sorted(state.connections),
            "audiences": sorted(state.audiences),
        }
    )


async def control_reset(request: web.Request) -> web.Response:
    request.app[SANDBOX_STATE].reset()
    return web.Response(status=204)


async def _release_hanging(app: web.Application) -> None:
    app[SANDBOX_STATE].closing.set()


def create_app(
    settings: SandboxSettings | None = None, clock: Callable[[], float] = time.time
) -> web.Application:
    settings = settings or SandboxSettings()
    app = web.Application(middlewares=[observe, gate], client_max_size=settings.max_body_bytes)
    app[SANDBOX_STATE] = SandboxState(settings, clock)
    app.on_shutdown.append(_release_hanging)
    r = app.router
    r.add_post(api.TOKEN_PATH, token)
    r.add_post(api.RECORDS_PATH, post_records)
    r.add_get(api.RECORDS_PATH + "/{jobRequestId}", get_job)
    r.add_post(api.METADATA_PATH, create_audience)
    r.add_get(api.METADATA_PATH + "/{audienceId}", get_audience)
    r.add_put(api.METADATA_PATH + "/{audienceId}", update_audience)
    r.add_post(api.CONNECTIONS_PATH, create_connection)
    r.add_get(api.CONNECTIONS_PATH, list_connections)
    r.add_delete(api.CONNECTIONS_PATH, delete_connection)
    r.add_get(api.TERMS_PATH, get_terms)
    r.add_patch(api.TERMS_PATH, accept_terms)
    r.add_get(CONTROL_PREFIX + "/stats", control_stats)
    r.add_get(CONTROL_PREFIX + "/ledger", control_ledger)
    r.add_get(CONTROL_PREFIX + "/log", control_log)
    r.add_get(CONTROL_PREFIX + "/audiences/{audienceId}/members", control_members)
    r.add_post(CONTROL_PREFIX + "/faults", control_faults)
    r.add_post(CONTROL_PREFIX + "/provide", control_provide)
    r.add_post(CONTROL_PREFIX + "/reset", control_reset)
    return app
