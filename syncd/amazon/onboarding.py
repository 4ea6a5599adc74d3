"""Onboarding commands: `syncd terms show|accept`, `syncd connections list|create`,
`syncd audiences create|get|update`. Each talks to the configured API (Amazon or the sandbox)
with the config's credentials and prints its result as JSON on stdout. (`syncd audiences status`
joins the group from syncd/operate.py: it reads the store too.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from syncd import config as config_mod
from syncd.amazon.api import TTL_MAX_SECONDS
from syncd.amazon.client import AmazonClient
from syncd.errors import UsageError
from syncd.operate import add_status_parser

Action = Callable[[AmazonClient, argparse.Namespace], Awaitable[Any]]


def add_parser(sub: Any) -> None:
    """Register `terms`, `connections` and `audiences` with their subcommands."""
    terms = _group(sub, "terms", "AMC terms of the user who gave the OAuth grant")
    _command(terms, "show", "print the AMC terms and whether they are accepted", _terms_show)
    accept = _command(terms, "accept", "accept the AMC terms", _terms_accept)
    accept.add_argument(
        "--agreement-token",
        help="the agreementToken from `terms show` (default: fetch the current one)",
    )

    conns = _group(sub, "connections", "connections (AMC instance / DSP advertiser targets)")
    lst = _command(conns, "list", "list connections", _connections_list)
    lst.add_argument("--connection-id", help="only this connection")
    lst.add_argument("--default", action="store_true", help="only the default connection")
    create = _command(conns, "create", "create a connection", _connections_create)
    create.add_argument("--amc-account-id")
    create.add_argument("--amc-account-marketplace-id")
    create.add_argument("--amc-instance-id")
    create.add_argument("--dsp-advertiser-id")
    create.add_argument("--dsp-profile-id")
    create.add_argument("--default", action="store_true", help="make it the default connection")

    auds = _group(sub, "audiences", "audience metadata")
    acreate = _command(auds, "create", "create an audience", _audiences_create)
    acreate.add_argument("--name", required=True, help="10..128 alphanumeric characters")
    target = acreate.add_mutually_exclusive_group(required=True)
    target.add_argument("--connection-id")
    target.add_argument("--advertiser-id", type=config_mod.amazon_id)
    acreate.add_argument("--description")
    acreate.add_argument("--country-code", help="ISO 3166-1 alpha-2, e.g. US")
    acreate.add_argument("--external-audience-id")
    acreate.add_argument("--ttl", type=_ttl, help=f"seconds, 0..{TTL_MAX_SECONDS}")
    get = _command(auds, "get", "show an audience (incl. metadata.audienceSize)", _audiences_get)
    get.add_argument("audience_id", type=config_mod.amazon_id)
    update = _command(auds, "update", "update description and/or ttl", _audiences_update)
    update.add_argument("audience_id", type=config_mod.amazon_id)
    update.add_argument("--description")
    update.add_argument("--ttl", type=_ttl, help=f"seconds, 0..{TTL_MAX_SECONDS}")
    add_status_parser(auds)  # reads the store too: syncd/operate.py


def _group(sub: Any, name: str, help_text: str) -> Any:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(dest=f"{name}_command", required=True)


def _command(group: Any, name: str, help_text: str, action: Action) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = group.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--config", required=True, help="syncd TOML config (credentials)")
    parser.set_defaults(func=lambda args: _main(args, action))
    return parser


def _ttl(text: str) -> int:
    if not text.isdigit() or int(text) > TTL_MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be 0..{TTL_MAX_SECONDS} seconds, got {text!r}")
    return int(text)


def _main(args: argparse.Namespace, action: Action) -> int:
    """Run one command and print its JSON result; errors are reported by syncd/cli.py."""
    try:
        result = asyncio.run(_run(args, action))
    except ValueError as exc:  # a bad argument the client refused before sending anything
        raise UsageError(str(exc)) from None
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


async def _run(args: argparse.Namespace, action: Action) -> Any:
    cfg = config_mod.load(args.config, os.environ)
    config_mod.require_credentials(cfg)
    async with AmazonClient(cfg.amazon) as client:
        return await action(client, args)


async def _terms_show(client: AmazonClient, args: argparse.Namespace) -> Any:
    terms = await client.get_terms()
    return {
        "agreementContent": terms.agreement_content,
        "agreementToken": terms.agreement_token,
        "hasAccepted": terms.has_accepted,
    }


async def _terms_accept(client: AmazonClient, args: argparse.Namespace) -> Any:
    token = args.agreement_token
    if not token:
        token = (await client.get_terms()).agreement_token
    await client.accept_terms(token)
    return {"agreementToken": token, "hasAccepted": True}


async def _connections_list(client: AmazonClient, args: argparse.Namespace) -> Any:
    found = await client.list_connections(
        connection_id=args.connection_id, is_default=True if args.default else None
    )
    return {"connections": [c.raw for c in found]}


async def _connections_create(client: AmazonClient, args: argparse.Namespace) -> Any:
    connection_id = await client.create_connection(
        amc_account_id=args.amc_account_id,
        amc_account_marketplace_id=args.amc_account_marketplace_id,
        amc_instance_id=args.amc_instance_id,
        dsp_advertiser_id=args.dsp_advertiser_id,
        dsp_profile_id=args.dsp_profile_id,
        is_default=args.default,
    )
    return {"connectionId": connection_id}


async def _audiences_create(client: AmazonClient, args: argparse.Namespace) -> Any:
    audience = await client.create_audience(
        args.name,
        connection_id=args.connection_id,
        advertiser_id=args.advertiser_id,
        description=args.description,
        country_code=args.country_code,
        external_audience_id=args.external_audience_id,
        ttl_s=args.ttl,
    )
    return audience.raw


async def _audiences_get(client: AmazonClient, args: argparse.Namespace) -> Any:
    return (await client.get_audience(args.audience_id)).raw


async def _audiences_update(client: AmazonClient, args: argparse.Namespace) -> Any:
    audience = await client.update_audience(
        args.audience_id, description=args.description, ttl_s=args.ttl
    )
    return audience.raw
