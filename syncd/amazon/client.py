"""The client of the Amazon Ads "Advertiser audiences" API (all ten operations) and of LwA.

One aiohttp session per client (pooled connections), bounded concurrency, per-request timeout,
retries per RetryPolicy, one forced token refresh + one resend on a 401 (a second 401 is a
RejectedError of that call, not a credential failure: LwA just issued the token). JSON is
parsed with orjson so an 18-digit `audienceId` stays an exact int. Error messages carry the
operation, the HTTP status and Amazon's own message, never a request body.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from syncd.amazon.api import (
    AUDIENCES_MEDIA_TYPE,
    CLIENT_ID_HEADER,
    CONNECTIONS_MEDIA_TYPE,
    CONNECTIONS_PATH,
    ENDPOINTS,
    METADATA_PATH,
    RECORDS_PATH,
    TERMS_PATH,
    Audience,
    Connection,
    InvalidRecord,
    JobStatus,
    Terms,
    as_object,
)
from syncd.amazon.auth import TokenProvider
from syncd.amazon.retry import (
    TOKEN_OPERATION,
    Clock,
    Retrier,
    RetryPolicy,
    Rng,
    Sleep,
    classify,
    nothing_accepted,
    parse_retry_after,
)
from syncd.config import AmazonConfig
from syncd.errors import (
    AmazonError,
    AuthError,
    NotSentError,
    RejectedError,
    RetryableError,
    ThrottledError,
)
from syncd.observability import metrics
from syncd.vocabulary import AMAZON_JOB_STATES

OnThrottle = Callable[[float | None], None]

# Requests in flight at once over the whole client (all connections, polls, onboarding). The
# semaphore is taken before the request so the request timeout never counts time spent queued.
MIN_SLOTS = 16
SLOTS_PER_CONNECTION_SLOT = 4

_SHA256ISH = re.compile(r"[0-9a-fA-F]{64}")
MAX_JOB_REQUEST_ID = 128  # characters of jobs.job_request_id (syncd.store.schema)
_MAX_MESSAGE = 300
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # no jobRequestId holds one


class AmazonClient:
    """Async client; use as `async with AmazonClient(cfg) as client:`."""

    def __init__(
        self,
        cfg: AmazonConfig,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: Rng = random.random,
    ) -> None:
        default_api, default_token = ENDPOINTS[cfg.region]
        self._cfg = cfg
        self.api_url = (cfg.api_url or default_api).rstrip("/")
        self.token_url = cfg.token_url or default_token
        self._retrier = Retrier(RetryPolicy.from_config(cfg), clock=clock, sleep=sleep, rng=rng)
        self._slots_total = max(MIN_SLOTS, cfg.max_concurrency * SLOTS_PER_CONNECTION_SLOT)
        self._slots = asyncio.Semaphore(self._slots_total)
        self._session: aiohttp.ClientSession | None = None
        self._auth = TokenProvider(self._fetch_token, retrier=self._retrier, clock=clock)

    async def __aenter__(self) -> AmazonClient:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._slots_total),
            timeout=aiohttp.ClientTimeout(total=self._cfg.request_timeout_s),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- auth ----------------------------------------------------------------------------------

    async def ensure_token(self) -> None:
        """Fetch a token now (raises AuthError if the credentials are refused)."""
        await self._auth.token()

    @property
    def token_held(self) -> bool:
        return self._auth.held

    @property
    def token_refresh_in(self) -> float:
        """Seconds until the cached access token is due for refresh."""
        return self._auth.refresh_in

    @property
    def fatal_error(self) -> AuthError | None:
        return self._auth.fatal_error

    # -- records -------------------------------------------------------------------------------

    async def post_records(
        self,
        body: bytes,
        *,
        connection_id: str,
        on_throttle: OnThrottle | None = None,
    ) -> str:
        """POST an encoded records body; returns the jobRequestId. `connection_id` names the
        body's target (for errors/logs); `on_throttle(retry_after)` is called on every 429.

        Resent only after an answer that proves nothing was accepted (429, a connection that
        could not be opened; a 401 once, after a token refresh), never after a 5xx, a timeout or
        a dropped connection: Amazon may have accepted that POST, and each one it counts must be
        covered by a budget reservation of its own (the sender resends, see syncd/deliver.py)."""
        operation = "records_post"
        data = await self._call(
            "POST",
            RECORDS_PATH,
            operation=operation,
            media_type=AUDIENCES_MEDIA_TYPE,
            body=body,
            on_throttle=on_throttle,
            resend_if=nothing_accepted,
        )
        job_id = _field(data, "jobRequestId", operation)
        if not isinstance(job_id, str) or not job_id:
            raise _unexpected(operation, f"jobRequestId for connection {connection_id}")
        if _CONTROL.search(job_id):
            raise AmazonError(
                f"{operation}: unexpected response from Amazon (a jobRequestId holding a control "
                f"character for connection {connection_id})",
                status=None,
                operation=operation,
            )
        if len(job_id) > MAX_JOB_REQUEST_ID or job_id in (".", ".."):
            raise AmazonError(
                f"{operation}: unexpected response from Amazon (a jobRequestId of {len(job_id)} "
                f"characters for connection {connection_id}; syncd stores up to "
                f"{MAX_JOB_REQUEST_ID} and polls it as one path segment, never . or ..)",
                status=None,
                operation=operation,
            )
        return job_id

    async def get_job(self, job_request_id: str) -> JobStatus:
        operation = "records_get"
        _require(job_request_id, "job_request_id")
        data = await self._call(
            "GET",
            f"{RECORDS_PATH}/{quote(job_request_id, safe='')}",  # one path segment, as is
            operation=operation,
            media_type=AUDIENCES_MEDIA_TYPE,
        )
        return _job_status(data, job_request_id, operation)

    # -- audience metadata ---------------------------------------------------------------------

    async def create_audience(
        self,
        name: str,
        *,
        connection_id: str | None = None,
        advertiser_id: int | None = None,
        description: str | None = None,
        country_code: str | None = None,
        external_audience_id: str | None = None,
        ttl_s: int | None = None,
    ) -> Audience:
        """Create one audience (synchronous on Amazon's side); target a connection or a DSP
        advertiser."""
        operation = "metadata_post"
        if not connection_id and advertiser_id is None:
            raise ValueError("create_audience needs connection_id or advertiser_id")
        target: dict[str, Any] = {}
        if connection_id:
            target["connectionId"] = connection_id
        if advertiser_id is not None:
            target["advertiserId"] = advertiser_id
        payload: dict[str, Any] = {"name": name, "targetResource": target}
        if description is not None:
            payload["description"] = description
        if country_code is not None:
            payload["countryCode"] = country_code
        metadata = _without_none({"externalAudienceId": external_audience_id, "ttl": ttl_s})
        if metadata:
            payload["metadata"] = metadata
        data = await self._call(
            "POST",
            METADATA_PATH,
            operation=operation,
            media_type=AUDIENCES_MEDIA_TYPE,
            body=orjson.dumps(payload),
            resend_if=_answered,
        )
        return _audience(data, operation)

    async def update_audience(
        self, audience_id: int, *, description: str | None = None, ttl_s: int | None = None
    ) -> Audience:
        """Update description and/or ttl; returns the audience as Amazon echoes it."""
        operation = "metadata_put"
        payload: dict[str, Any] = _without_none({"description": description})
        if ttl_s is not None:
            payload["metadata"] = {"ttl": ttl_s}
        if not payload:
            raise ValueError("update_audience needs description or ttl_s")
        data = await self._call(
            "PUT",
            f"{METADATA_PATH}/{_audience_id(audience_id)}",
            operation=operation,
            media_type=AUDIENCES_MEDIA_TYPE,
            body=orjson.dumps(payload),
        )
        if isinstance(data, dict) and "audienceId" in data:
            return _audience(data, operation)
        return Audience(audience_id=audience_id, raw=data if isinstance(data, dict) else {})

    async def get_audience(self, audience_id: int) -> Audience:
        operation = "metadata_get"
        data = await self._call(
            "GET",
            f"{METADATA_PATH}/{_audience_id(audience_id)}",
            operation=operation,
            media_type=AUDIENCES_MEDIA_TYPE,
        )
        if isinstance(data, dict) and "audienceId" not in data:
            data = {**data, "audienceId": audience_id}
        return _audience(data, operation)

    # -- connections ---------------------------------------------------------------------------

    async def list_connections(
        self, connection_id: str | None = None, is_default: bool | None = None
    ) -> list[Connection]:
        operation = "connections_get"
        params: dict[str, str] = {}
        if connection_id:
            params["connectionId"] = connection_id
        if is_default is not None:
            params["isDefault"] = "true" if is_default else "false"
        data = await self._call(
            "GET",
            CONNECTIONS_PATH,
            operation=operation,
            media_type=CONNECTIONS_MEDIA_TYPE,
            params=params,
        )
        items = _field(data, "connections", operation)
        if not isinstance(items, list):
            raise _unexpected(operation, "connections list")
        out: list[Connection] = []
        for item in items:
            cid = item.get("connectionId") if isinstance(item, dict) else None
            if not isinstance(cid, str):
                raise _unexpected(operation, "connectionId")
            out.append(Connection(connection_id=cid, raw=item))
        return out

    async def create_connection(
        self,
        *,
        amc_account_id: str | None = None,
        amc_account_marketplace_id: str | None = None,
        amc_instance_id: str | None = None,
        dsp_advertiser_id: str | None = None,
        dsp_profile_id: str | None = None,
        is_default: bool = False,
    ) -> str:
        """Create a connection to an AMC instance and/or a DSP advertiser; returns its id."""
        operation = "connections_post"
        if not amc_instance_id and not dsp_advertiser_id:
            raise ValueError("create_connection needs amc_instance_id or dsp_advertiser_id")
        payload = _without_none(
            {
                "amcAccountId": amc_account_id,
                "amcAccountMarketplaceId": amc_account_marketplace_id,
                "amcInstanceId": amc_instance_id,
                "dspAdvertiserId": dsp_advertiser_id,
                "dspProfileId": dsp_profile_id,
                "isDefault": is_default,
            }
        )
        data = await self._call(
            "POST",
            CONNECTIONS_PATH,
            operation=operation,
            media_type=CONNECTIONS_MEDIA_TYPE,
            body=orjson.dumps(payload),
            resend_if=_answered,
        )
        cid = _field(data, "connectionId", operation)
        if not isinstance(cid, str) or not cid:
            raise _unexpected(operation, "connectionId")
        return cid

    async def delete_connection(self, connection_id: str) -> None:
        """Invalidate ONE connection. Without the parameter Amazon deletes every connection,
        so an empty id is refused here and never sent."""
        if not isinstance(connection_id, str) or not connection_id.strip():
            raise ValueError("delete_connection needs a connection_id (empty would delete ALL)")
        await self._call(
            "DELETE",
            CONNECTIONS_PATH,
            operation="connections_delete",
            media_type=CONNECTIONS_MEDIA_TYPE,
            params={"connectionId": connection_id},
        )

    # -- AMC terms -----------------------------------------------------------------------------

    async def get_terms(self) -> Terms:
        operation = "terms_get"
        data = await self._call(
            "GET", TERMS_PATH, operation=operation, media_type=CONNECTIONS_MEDIA_TYPE
        )
        accepted = _field(data, "hasAccepted", operation)
        if not isinstance(accepted, bool):
            raise _unexpected(operation, "hasAccepted")
        return Terms(
            agreement_content=str(data.get("agreementContent") or ""),
            agreement_token=str(data.get("agreementToken") or ""),
            has_accepted=accepted,
        )

    async def accept_terms(self, agreement_token: str) -> None:
        _require(agreement_token, "agreement_token")
        await self._call(
            "PATCH",
            TERMS_PATH,
            operation="terms_patch",
            media_type=CONNECTIONS_MEDIA_TYPE,
            body=orjson.dumps({"agreementToken": agreement_token, "hasAccepted": True}),
        )

    # -- transport -----------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        operation: str,
        media_type: str,
        body: bytes | None = None,
        params: Mapping[str, str] | None = None,
        on_throttle: OnThrottle | None = None,
        resend_if: Callable[[RetryableError], bool] = lambda _exc: True,
    ) -> Any:
        """One API operation with auth, retries and error mapping; returns the parsed JSON body
        (None when empty). A retryable failure is resent only if `resend_if` allows it: a
        non-idempotent call passes a narrower test than the default "always"."""
        if self.fatal_error is not None:
            raise self.fatal_error
        url = self.api_url + path

        async def attempt() -> Any:
            token = await self._auth.token()
            status, raw, retry_after = await self._send_api(
                method, url, operation, media_type, token, body, params
            )
            if status == 401:
                token = await self._auth.refresh(stale=token)
                status, raw, retry_after = await self._send_api(
                    method, url, operation, media_type, token, body, params
                )
                if status == 401:  # LwA just issued the token: Amazon refuses this request
                    raise RejectedError(
                        f"{operation} failed: HTTP 401 even after a token refresh: {_message(raw)}",
                        status=401,
                        operation=operation,
                    )
            if 200 <= status < 300:
                return _loads(raw, operation)
            error = _api_error(status, raw, parse_retry_after(retry_after), operation)
            if isinstance(error, ThrottledError):
                metrics.REQUESTS_THROTTLED.labels(operation).inc()
                if on_throttle is not None:
                    on_throttle(error.retry_after)
            raise error

        def retry_if(exc: RetryableError) -> bool:
            if exc.operation == TOKEN_OPERATION:
                return False  # the token request already ran its own retries
            return resend_if(exc)

        return await self._retrier.call(attempt, endpoint=operation, retry_if=retry_if)

    async def _send_api(
        self,
        method: str,
        url: str,
        operation: str,
        media_type: str,
        token: str,
        body: bytes | None,
        params: Mapping[str, str] | None,
    ) -> tuple[int, bytes, str | None]:
        headers = {
            "Authorization": f"Bearer {token}",
            CLIENT_ID_HEADER: self._cfg.client_id,
            "Accept": media_type,
        }
        if body is not None:
            headers["Content-Type"] = media_type
        return await self._send(method, url, operation, headers=headers, data=body, params=params)

    async def _fetch_token(self) -> tuple[int, bytes, str | None]:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": self._cfg.refresh_token,
            "client_id": self._cfg.client_id,
            "client_secret": self._cfg.client_secret,
        }
        headers = {"Accept": "application/json"}
        return await self._send("POST", self.token_url, TOKEN_OPERATION, headers=headers, data=form)

    async def _send(
        self,
        method: str,
        url: str,
        endpoint: str,
        *,
        headers: Mapping[str, str],
        data: bytes | Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes, str | None]:
        """One HTTP exchange: (status, body, Retry-After). Timeouts and connection failures
        become RetryableError (status None) with the aiohttp error as cause."""
        session = self._session
        if session is None:
            raise RuntimeError("AmazonClient used outside `async with`")
        async with self._slots:
            started = time.perf_counter()
            status_label = "error"
            try:
                async with session.request(
                    method, url, headers=headers, data=data, params=params
                ) as resp:
                    raw = await resp.read()
                    status_label = str(resp.status)
                    return resp.status, raw, resp.headers.get("Retry-After")
            except TimeoutError as exc:
                raise RetryableError(
                    f"{endpoint}: no answer within {self._cfg.request_timeout_s:g}s "
                    "(outcome unknown)",
                    operation=endpoint,
                ) from exc
            except aiohttp.ClientConnectorError as exc:  # before anything was sent
                raise NotSentError(
                    f"{endpoint}: cannot connect: {type(exc).__name__}", operation=endpoint
                ) from exc
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                raise RetryableError(
                    f"{endpoint}: connection error: {type(exc).__name__}", operation=endpoint
                ) from exc
            finally:
                metrics.REQUEST_DURATION.labels(endpoint, status_label).observe(
                    time.perf_counter() - started
                )


def _answered(exc: RetryableError) -> bool:
    """Resend test of a non-idempotent call: Amazon answered (or never got it), so it was not
    done; after a timeout or a dropped connection it may have been."""
    return exc.status is not None or isinstance(exc, NotSentError)


# -- parsing helpers ---------------------------------------------------------------------------


def _loads(raw: bytes, operation: str) -> Any:
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _unexpected(operation, "a JSON body") from None


def _message(raw: bytes) -> str:
    """Amazon's error text (`message` or `Message`), shortened, with anything hash-like masked."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    text = ""
    if isinstance(data, dict):
        found = data.get("message") or data.get("Message") or data.get("error_description")
        text = str(found) if found else ""
    if not text:
        text = "no message"
    text = _text(_SHA256ISH.sub("<sha256>", text))
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


def _text(value: object) -> str:
    """Amazon's text as syncd keeps it: a NUL (which PostgreSQL cannot store) as U+FFFD."""
    return str(value).replace("\x00", "\ufffd")


def _api_error(status: int, raw: bytes, retry_after: float | None, operation: str) -> AmazonError:
    message = f"{operation} failed: HTTP {status}: {_message(raw)}"
    kind = classify(status)
    if kind is ThrottledError:
        return ThrottledError(message, retry_after=retry_after, operation=operation)
    return kind(message, status=status, operation=operation)


def _unexpected(operation: str, what: str) -> AmazonError:
    return AmazonError(
        f"{operation}: unexpected response from Amazon (no {what})",
        status=None,
        operation=operation,
    )


def _field(data: Any, key: str, operation: str) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise _unexpected(operation, key)
    return data[key]


def _require(value: str, name: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _audience_id(value: Any) -> int:
    """An audienceId as an exact int: ints pass, digit strings convert, anything else fails."""
    if isinstance(value, bool):
        raise ValueError("audience_id must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise ValueError(f"audience_id must be an integer, got {type(value).__name__}")


def _audience(data: Any, operation: str) -> Audience:
    try:
        audience_id = _audience_id(_field(data, "audienceId", operation))
    except ValueError:
        raise _unexpected(operation, "integer audienceId") from None
    return Audience(audience_id=audience_id, raw=data)


# The largest counts the store's columns take (jobs.received_records and matched_records are
# integers, audience_size a bigint): a count beyond them, or below 0, is no count.
_MAX_RECORD_COUNT = 2**31 - 1
_MAX_AUDIENCE_SIZE = 2**63 - 1


def _count(value: Any, maximum: int) -> int | None:
    """A count of Amazon's job status, or None when it is not an int in 0..maximum."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum
    return value if ok else None


def _job_status(data: Any, job_request_id: str, operation: str) -> JobStatus:
    state = _field(data, "jobState", operation)
    if not isinstance(state, str) or state not in AMAZON_JOB_STATES:
        raise AmazonError(
            f"{operation}: unknown jobState {str(state)[:40]!r}", status=200, operation=operation
        )
    successful = data.get("successful")
    rate = successful.get("recordsProcessedRate") if isinstance(successful, dict) else None
    size = as_object(data.get("audienceSize"))
    invalid: list[InvalidRecord] = []
    items = data.get("invalidRecords")
    for item in items if isinstance(items, list) else ():  # another shape: none readable
        if isinstance(item, dict):
            ext = item.get("externalId", item.get("externalUserId"))
            invalid.append(
                InvalidRecord(
                    external_id=_text(ext) if ext is not None else None,
                    error=_text(item.get("error") or item.get("message") or ""),
                )
            )
    return JobStatus(
        job_request_id=str(data.get("jobRequestId") or job_request_id),
        job_state=state,
        processed_rate=float(rate) if isinstance(rate, int | float) else None,
        invalid_records=tuple(invalid),
        received_record_size=_count(size.get("receivedRecordSize"), _MAX_RECORD_COUNT),
        id_resolution_count=_count(size.get("idResolutionCount"), _MAX_RECORD_COUNT),
        dsp_audience_size=_count(size.get("dspAudienceSize"), _MAX_AUDIENCE_SIZE),
    )
