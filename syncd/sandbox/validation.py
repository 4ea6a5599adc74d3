"""Validation of sandbox requests: pure functions from a request (or a part of one) to its first
problem, a message naming the field and the rule (Amazon-like 400 `{"message": ...}`), or None.
No state, no I/O: the handlers (app.py) and the state (state.py) call them.

Messages name fields and rules, never the values: a request may carry PII.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from typing import Any

from syncd.amazon import api
from syncd.vocabulary import (
    CONSENT_ANSWERS,
    CONSENT_VALUES,
    MAX_HASHED_PII_OBJECTS,
    MAX_HASHED_VALUES_PER_MEMBER,
    PII_KEYS,
    ConsentSignal,
)

PII_KEY_SET = frozenset(PII_KEYS)
ACTIONS = ("CREATE", "DELETE")
TARGET_TYPES = ("AMC", "DSP")
RECORDS_BODY_KEYS = frozenset({"audienceId", "targetResource", "records"})
RECORD_KEYS = frozenset(
    {"externalUserId", "countryCode", "action", "hashedPII", "userConsent", "measurements"}
)
USER_CONSENT_KEYS = frozenset({"consent", "geo"})
CONSENT_KEYS = frozenset({"amzn", "tcf", "gpp"})
AMZN_CONSENT_KEYS = frozenset({"amznAdStorage", "amznUserData"})
GEO_KEYS = frozenset({"countryCode", "ipAddress"})
# Members whose personal data needs a consent signal (Amazon: UK and EEA; we add CH): the EU,
# Iceland, Liechtenstein, Norway, the United Kingdom and Switzerland.
EU_COUNTRIES = "AT BE BG CY CZ DE DK EE ES FI FR GR HR HU IE IT LT LU LV MT NL PL PT RO SE SI SK"
CONSENT_COUNTRIES = frozenset(f"{EU_COUNTRIES} IS LI NO GB CH".split())
METADATA_KEYS = frozenset({"name", "description", "countryCode", "targetResource", "metadata"})
CONNECTION_KEYS = frozenset(
    {
        "amcAccountId",
        "amcAccountMarketplaceId",
        "amcInstanceId",
        "dspAdvertiserId",
        "dspProfileId",
        "isDefault",
    }
)
COUNTRY_CODE = re.compile(r"[A-Z]{2}")
AUDIENCE_NAME = re.compile(r"[0-9A-Za-z]{10,128}")

Check = str | None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}
    if value is None:
        return "null"
    return names.get(type(value), "object")


def check_keys(obj: dict[str, Any], allowed: frozenset[str], where: str) -> Check:
    if obj.keys() <= allowed:
        return None
    unknown = sorted(str(k)[:64] for k in obj if k not in allowed)
    return f"{where} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"


def check_audience_id(value: Any) -> Check:
    if not _is_int(value):
        return f"audienceId must be an integer, got {_json_type(value)}"
    if value <= 0:
        return "audienceId must be a positive integer"
    return None


def check_target_resource(value: Any) -> Check:
    if value is None:
        return "targetResource.connectionId is required"
    if not isinstance(value, dict):
        return f"targetResource must be an object, got {_json_type(value)}"
    error = check_keys(value, frozenset({"connectionId", "targetTypes"}), "targetResource")
    if error:
        return error
    connection_id = value.get("connectionId")
    if connection_id is None:
        return "targetResource.connectionId is required"
    if not isinstance(connection_id, str) or not connection_id.strip():
        return "targetResource.connectionId must be a non-empty string"
    types = value.get("targetTypes")
    if types is not None and (
        not isinstance(types, list) or not all(t in TARGET_TYPES for t in types)
    ):
        return "targetResource.targetTypes must be a list of AMC and/or DSP"
    return None


def check_records_list(value: Any, max_records: int) -> Check:
    if not isinstance(value, list):
        return f"records must be an array, got {_json_type(value)}"
    if not value:
        return "records must hold at least 1 record"
    if len(value) > max_records:
        return f"records holds {len(value)} records; at most {max_records} per request"
    return None


# The record checks return the rest of a message that starts with the record's path
# (`records[i]`), which `check_record` puts in front: nothing is formatted for a valid record.


def check_external_user_id(value: Any) -> Check:
    if value is None:
        return ".externalUserId is required"
    if not isinstance(value, str) or not api.EXTERNAL_USER_ID.fullmatch(value):
        return f".externalUserId must match {api.EXTERNAL_USER_ID.pattern}"
    return None


def check_action(value: Any) -> Check:
    if value not in ACTIONS or not isinstance(value, str):
        return f".action must be one of {', '.join(ACTIONS)}"
    return None


def check_country_code(value: Any, where: str = "") -> Check:
    """Optional; when present an ISO 3166-1 alpha-2 code (2 upper-case letters)."""
    if value is not None and (not isinstance(value, str) or not COUNTRY_CODE.fullmatch(value)):
        return f"{where}.countryCode must be an ISO 3166-1 alpha-2 code (2 upper-case letters)"
    return None


_HEX = b"0123456789abcdef"


def _all_digests(values: Collection[Any]) -> bool:
    """Every value matches `api.SHA256_HEX` (64 lower-case hex characters), checked for all of
    them at once: half of what the regex cost. `translate` deletes the hex bytes and so
    keeps anything else (non-ASCII text encodes to bytes that are not hex)."""
    try:
        joined = "".join(values).encode("utf-8", "surrogatepass")
    except TypeError:  # a value that is not a string
        return False
    return set(map(len, values)) == {64} and not joined.translate(None, _HEX)


def check_pii_object(obj: Any) -> Check:
    """One hashedPII object; the message continues its path (" must be ...", ".email ...")."""
    if not isinstance(obj, dict) or not obj:
        return " must be a non-empty object"
    error = check_keys(obj, PII_KEY_SET, "")
    if error:
        return error
    if _all_digests(obj.values()):  # the common case
        return None
    for key, digest in obj.items():
        if not isinstance(digest, str) or not api.SHA256_HEX.fullmatch(digest):
            return f".{key} must be a 64-character lowercase hex SHA-256 digest"
    return None


def check_hashed_pii(value: Any) -> Check:
    limit = MAX_HASHED_PII_OBJECTS
    if not isinstance(value, list) or not 1 <= len(value) <= limit:
        return f".hashedPII must be an array of 1 to {limit} objects"
    total = 0
    for j, obj in enumerate(value):
        error = check_pii_object(obj)
        if error:
            return f".hashedPII[{j}]{error}"
        total += len(obj)
    if total > MAX_HASHED_VALUES_PER_MEMBER:
        return (
            f".hashedPII holds {total} hashed values; "
            f"at most {MAX_HASHED_VALUES_PER_MEMBER} per member"
        )
    return None


def check_ip_address(value: Any) -> bool:
    """An IPv4 or IPv6 address in its plain text form (no zone id, no padding)."""
    if not isinstance(value, str) or "%" in value:
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def check_geo(value: Any) -> Check:
    """Where the consent was collected: `{"countryCode": ISO2, "ipAddress": IPv4/IPv6}`, both
    optional."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return ".userConsent.geo must be an object"
    error = check_keys(value, GEO_KEYS, ".userConsent.geo") or check_country_code(
        value.get("countryCode"), ".userConsent.geo"
    )
    if error:
        return error
    if "ipAddress" in value and not check_ip_address(value["ipAddress"]):
        return ".userConsent.geo.ipAddress must be an IPv4 or IPv6 address"
    return None


def check_user_consent(value: Any) -> Check:
    if value is None:
        return None
    if not isinstance(value, dict) or "consent" not in value:
        return ".userConsent must be an object with a consent key (and optionally geo)"
    error = check_keys(value, USER_CONSENT_KEYS, ".userConsent") or check_geo(value.get("geo"))
    if error:
        return error
    consent = value["consent"]
    if not isinstance(consent, dict):
        return ".userConsent.consent must be an object"
    error = check_keys(consent, CONSENT_KEYS, ".userConsent.consent")
    if error:
        return error
    for key in ("tcf", "gpp"):
        if key in consent and not isinstance(consent[key], str):
            return f".userConsent.consent.{key} must be a string"
    amzn = consent.get("amzn")
    if amzn is None:
        return None
    if not isinstance(amzn, dict):
        return ".userConsent.consent.amzn must be an object"
    error = check_keys(amzn, AMZN_CONSENT_KEYS, ".userConsent.consent.amzn")
    if error:
        return error
    for key, grant in amzn.items():
        if not isinstance(grant, str) or grant not in CONSENT_VALUES:
            return f".userConsent.consent.amzn.{key} must be one of {', '.join(ConsentSignal)}"
    return None


def consent_refusal(record: dict[str, Any], audience_country: str | None) -> Check:
    """Why a valid record is refused when consent is required, or None.

    A CREATE for a member of the UK/EEA/CH needs a consent signal: `amznUserData` GRANTED or
    DENIED, or a TCF or GPP string (Amazon accepts any of the three formats). The member's
    country for consent is `userConsent.geo.countryCode`, else the record's `countryCode`,
    else the audience's (Amazon's resolution order)."""
    if record["action"] != "CREATE":
        return None
    user_consent = record.get("userConsent") or {}
    geo = user_consent.get("geo") or {}
    country = geo.get("countryCode") or record.get("countryCode") or audience_country
    if country not in CONSENT_COUNTRIES:
        return None
    consent = user_consent.get("consent") or {}
    amzn = consent.get("amzn") or {}
    if amzn.get("amznUserData") in CONSENT_ANSWERS or consent.get("tcf") or consent.get("gpp"):
        return None
    return (
        "CONSENT_REQUIRED: a UK/EEA/CH member needs consent: userConsent.consent.amzn."
        "amznUserData GRANTED or DENIED, or a tcf or gpp string"
    )


def check_record(record: Any, index: int) -> Check:
    error = _record_error(record)
    return None if error is None else f"records[{index}]{error}"


def _record_error(record: Any) -> Check:
    if not isinstance(record, dict):
        return f" must be an object, got {_json_type(record)}"
    measurements = record.get("measurements")
    if measurements is not None and not isinstance(measurements, dict):
        return ".measurements must be an object"
    return (
        check_keys(record, RECORD_KEYS, "")
        or check_external_user_id(record.get("externalUserId"))
        or check_action(record.get("action"))
        or check_country_code(record.get("countryCode"))
        or check_hashed_pii(record.get("hashedPII"))
        or check_user_consent(record.get("userConsent"))
    )


def check_records_body(body: Any, max_records: int) -> Check:
    """The first problem of a POST /amc/audiences/records body, or None when it is valid."""
    if not isinstance(body, dict):
        return f"request body must be a JSON object, got {_json_type(body)}"
    error = (
        check_keys(body, RECORDS_BODY_KEYS, "request body")
        or check_audience_id(body.get("audienceId"))
        or check_target_resource(body.get("targetResource"))
        or check_records_list(body.get("records"), max_records)
    )
    if error:
        return error
    for index, record in enumerate(body["records"]):
        error = check_record(record, index)
        if error:
            return error
    return None


def check_ttl(value: Any) -> Check:
    if value is not None and (not _is_int(value) or not 0 <= value <= api.TTL_MAX_SECONDS):
        return f"metadata.ttl must be an integer from 0 to {api.TTL_MAX_SECONDS} seconds"
    return None


def check_audience_metadata(value: Any) -> Check:
    if value is None:
        return None
    if not isinstance(value, dict):
        return "metadata must be an object"
    error = check_keys(value, frozenset({"externalAudienceId", "ttl"}), "metadata")
    if error:
        return error
    external = value.get("externalAudienceId")
    if external is not None and not isinstance(external, str):
        return "metadata.externalAudienceId must be a string"
    return check_ttl(value.get("ttl"))


def check_audience_name(value: Any) -> Check:
    if value is None:
        return "name is required"
    if not isinstance(value, str) or not AUDIENCE_NAME.fullmatch(value):
        return "name must be 10 to 128 alphanumeric characters"
    return None


def check_description(value: Any) -> Check:
    if value is not None and not isinstance(value, str):
        return "description must be a string"
    return None


def check_audience_target(value: Any) -> Check:
    if not isinstance(value, dict):
        return "targetResource with a connectionId or an advertiserId is required"
    error = check_keys(value, frozenset({"connectionId", "advertiserId"}), "targetResource")
    if error:
        return error
    connection_id, advertiser_id = value.get("connectionId"), value.get("advertiserId")
    if connection_id is None and advertiser_id is None:
        return "targetResource needs a connectionId or an advertiserId"
    if connection_id is not None and (not isinstance(connection_id, str) or not connection_id):
        return "targetResource.connectionId must be a non-empty string"
    if advertiser_id is not None and not _is_int(advertiser_id):
        return "targetResource.advertiserId must be an integer"
    return None


def check_create_audience(body: Any) -> Check:
    if not isinstance(body, dict):
        return f"request body must be a JSON object, got {_json_type(body)}"
    return (
        check_keys(body, METADATA_KEYS, "request body")
        or check_audience_name(body.get("name"))
        or check_description(body.get("description"))
        or check_country_code(body.get("countryCode"), "request body")
        or check_audience_target(body.get("targetResource"))
        or check_audience_metadata(body.get("metadata"))
    )


def check_update_audience(body: Any) -> Check:
    if not isinstance(body, dict):
        return f"request body must be a JSON object, got {_json_type(body)}"
    error = check_keys(body, METADATA_KEYS - {"targetResource"}, "request body")
    if error:
        return error
    name = body.get("name")
    return (
        (check_audience_name(name) if name is not None else None)
        or check_description(body.get("description"))
        or check_country_code(body.get("countryCode"), "request body")
        or check_audience_metadata(body.get("metadata"))
    )


def check_create_connection(body: Any) -> Check:
    if not isinstance(body, dict):
        return f"request body must be a JSON object, got {_json_type(body)}"
    error = check_keys(body, CONNECTION_KEYS, "request body")
    if error:
        return error
    if not body.get("amcInstanceId") and not body.get("dspAdvertiserId"):
        return "a connection needs an amcInstanceId or a dspAdvertiserId"
    for key in CONNECTION_KEYS - {"isDefault"}:
        if key in body and not isinstance(body[key], str):
            return f"{key} must be a string"
    if "isDefault" in body and not isinstance(body["isDefault"], bool):
        return "isDefault must be a boolean"
    return None


def check_terms_acceptance(body: Any, agreement_token: str) -> Check:
    if not isinstance(body, dict):
        return f"request body must be a JSON object, got {_json_type(body)}"
    error = check_keys(body, frozenset({"agreementToken", "hasAccepted"}), "request body")
    if error:
        return error
    if body.get("hasAccepted") is not True:
        return "hasAccepted must be true"
    if body.get("agreementToken") != agreement_token:
        return "agreementToken does not match the current terms (GET them first)"
    return None


def accepts(accept_header: str, media_type: str) -> bool:
    """Whether an Accept header allows `media_type` (wildcards included)."""
    main_type = media_type.split("/", 1)[0]
    allowed = {media_type, "*/*", f"{main_type}/*"}
    return any(part.split(";", 1)[0].strip() in allowed for part in accept_header.split(","))
