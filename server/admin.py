"""`disposition-admin`: manage partners, credentials, tenant grants, disposition catalogs and
webhook endpoints.

Works against the database of a running stack: DATABASE_URL, else the checkout's
var/disposition.db (what `make run` uses), wherever it is run from; outside a checkout
DATABASE_URL is required. Only `migrate` creates a database. Changes take effect on the
next request, with no restart. Output is JSON on stdout; errors go to stderr. Exit codes:
0 done, 1 unexpected failure, 2 bad usage (or no database to use, or a webhook URL or event
refused), 3 no such partner, grant or webhook endpoint, 4 already exists.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from typing import Any

from server.db import Database, SchemaOutdated
from server.records import WebhookDeliveryRecord, WebhookEndpointRecord
from server.settings import Settings, SettingsError, project_root
from server.usecases import catalogs, partners, webhooks

EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_EXISTS = 1, 2, 3, 4

Command = Callable[[Database, argparse.Namespace], Awaitable[Any]]


def _text(name: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if not value.strip() or len(value) > 255:
            raise argparse.ArgumentTypeError(f"{name} must be 1 to 255 characters, not blank")
        return value

    return parse


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


async def _create(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    issued = await partners.create_partner(
        db, partner_id=args.partner_id, name=args.name, rate_limit_per_minute=args.rate_limit
    )
    return asdict(issued)


async def _rotate(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    issued = await partners.rotate_secret(db, partner_id=args.partner_id)
    return {name: value for name, value in asdict(issued).items() if value is not None}


async def _rotate_webhook_secret(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    secret = await partners.rotate_webhook_secret(db, partner_id=args.partner_id)
    return {"partner_id": args.partner_id, "webhook_secret": secret}


async def _list(db: Database, args: argparse.Namespace) -> list[dict[str, Any]]:
    return [
        {
            "partner_id": partner.partner_id,
            "name": partner.name,
            "enabled": partner.enabled,
            "rate_limit_per_minute": partner.rate_limit_per_minute,
            "grants": [{"tenant_id": t, "sub_tenant_id": s} for t, s in grants],
        }
        for partner, grants in await partners.describe(db)
    ]


async def _set_enabled(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    await partners.set_enabled(db, partner_id=args.partner_id, enabled=args.enabled)
    return {"partner_id": args.partner_id, "enabled": args.enabled}


async def _set_rate_limit(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    await partners.set_rate_limit(db, partner_id=args.partner_id, per_minute=args.per_minute)
    return {"partner_id": args.partner_id, "rate_limit_per_minute": args.per_minute}


async def _grant(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    created = await partners.grant(
        db, partner_id=args.partner_id, tenant_id=args.tenant_id, sub_tenant_id=args.sub_tenant_id
    )
    return _grant_result(args, granted=True, changed=created)


async def _revoke(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    removed = await partners.revoke(
        db, partner_id=args.partner_id, tenant_id=args.tenant_id, sub_tenant_id=args.sub_tenant_id
    )
    if not removed:
        raise LookupError(
            f"partner {args.partner_id!r} has no grant for tenant {args.tenant_id!r}, "
            f"sub-tenant {args.sub_tenant_id!r}"
        )
    return _grant_result(args, granted=False, changed=True)


def _grant_result(args: argparse.Namespace, *, granted: bool, changed: bool) -> dict[str, Any]:
    return {
        "partner_id": args.partner_id,
        "tenant_id": args.tenant_id,
        "sub_tenant_id": args.sub_tenant_id,
        "granted": granted,
        "changed": changed,
    }


def _catalog_file(path: str) -> list[catalogs.Disposition]:
    """`--file`: a JSON list of dispositions, checked before the database is touched."""
    try:
        with open(path, encoding="utf-8") as file:
            raw = json.load(file)
        return catalogs.parse_definitions(raw)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"{path} is not valid JSON: {exc}") from None
    except catalogs.InvalidCatalog as exc:
        raise argparse.ArgumentTypeError(f"{path}: {exc}") from None


def _catalog_tenant(value: str) -> str:
    value = _text("--tenant-id")(value)
    if value == catalogs.TENANT_WIDE:
        raise argparse.ArgumentTypeError("a catalog belongs to one tenant; '*' is not a tenant")
    return value


def _catalog_result(
    args: argparse.Namespace, dispositions: list[catalogs.Disposition]
) -> dict[str, Any]:
    return {
        "tenant_id": args.tenant,
        "sub_tenant_id": args.sub_tenant,
        "dispositions": [asdict(entry) for entry in dispositions],
    }


async def _catalog_set(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    scope = {"tenant_id": args.tenant, "sub_tenant_id": args.sub_tenant}
    await catalogs.set_catalog(db, **scope, dispositions=args.file)
    return _catalog_result(args, await catalogs.get_catalog(db, **scope))


async def _catalog_list(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    found = await catalogs.get_catalog(db, tenant_id=args.tenant, sub_tenant_id=args.sub_tenant)
    return _catalog_result(args, found)


async def _catalog_clear(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    removed = await catalogs.clear_catalog(db, tenant_id=args.tenant, sub_tenant_id=args.sub_tenant)
    if not removed:
        raise LookupError(
            f"tenant {args.tenant!r} has no catalog for sub-tenant {args.sub_tenant!r}"
        )
    return {"tenant_id": args.tenant, "sub_tenant_id": args.sub_tenant, "cleared": removed}


async def _init_db(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    revision = await db.create_schema()
    return {"schema": "ready", "revision": revision}


def _when(value: Any) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def _endpoint(endpoint: WebhookEndpointRecord, secret: str | None = None) -> dict[str, Any]:
    shown: dict[str, Any] = {
        "id": endpoint.endpoint_id,
        "url": endpoint.url,
        "events": list(endpoint.events),
        "tenant_id": endpoint.tenant_id,
        "sub_tenant_id": endpoint.sub_tenant_id,
        "enabled": endpoint.enabled,
        "disabled_reason": endpoint.disabled_reason,
        "failing_since": _when(endpoint.failing_since),
        "created_at": _when(endpoint.created_at),
    }
    if secret is not None:
        shown["secret"] = secret
    return shown


def _delivery(delivery: WebhookDeliveryRecord) -> dict[str, Any]:
    return {
        "id": delivery.pk,
        "event_id": delivery.event_id,
        "event_type": delivery.event_type,
        "cursor": None if delivery.cursor is None else str(delivery.cursor),
        "status": delivery.status,
        "attempts": delivery.attempts,
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "next_attempt_at": _when(delivery.next_attempt_at),
        "delivered_at": _when(delivery.delivered_at),
        "created_at": _when(delivery.created_at),
    }


async def _webhook_create(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    created = await webhooks.create_endpoint(
        db,
        tenant_id=args.tenant_id,
        sub_tenant_id=args.sub_tenant_id,
        url=args.url,
        events=args.events or [],
        allow_private=db.settings.webhook_allow_private_urls,
    )
    return _endpoint(created.endpoint, created.secret)


async def _webhook_list(db: Database, args: argparse.Namespace) -> list[dict[str, Any]]:
    return [_endpoint(e) for e in await webhooks.list_endpoints(db, tenant_id=args.tenant_id)]


async def _webhook_set_enabled(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    return _endpoint(
        await webhooks.set_enabled(db, endpoint_id=args.endpoint_id, enabled=args.enabled)
    )


async def _webhook_delete(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    await webhooks.delete_endpoint(db, endpoint_id=args.endpoint_id)
    return {"id": args.endpoint_id, "deleted": True}


async def _webhook_rotate(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    rotated = await webhooks.rotate_secret(db, endpoint_id=args.endpoint_id)
    return _endpoint(rotated.endpoint, rotated.secret)


async def _webhook_deliveries(db: Database, args: argparse.Namespace) -> list[dict[str, Any]]:
    found = await webhooks.deliveries(
        db, endpoint_id=args.endpoint_id, status=args.status, limit=args.limit
    )
    return [_delivery(delivery) for delivery in found]


async def _webhook_replay(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    count = await webhooks.replay(
        db, endpoint_id=args.endpoint_id, delivery_ids=args.delivery_ids or None
    )
    return {"id": args.endpoint_id, "replayed": count}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disposition-admin",
        description="Manage partners, credentials, tenant grants and catalogs. The database: "
        "DATABASE_URL, else the project checkout's var/disposition.db.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        parent: Any, name: str, run: Command, help_text: str, **defaults: Any
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(
            name, help=help_text, description=help_text
        )
        sub.set_defaults(run=run, **defaults)
        return sub

    def partner_arg(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--partner-id", required=True, type=_text("--partner-id"))

    def grant_args(sub: argparse.ArgumentParser) -> None:
        partner_arg(sub)
        sub.add_argument(
            "--tenant-id", required=True, type=_text("--tenant-id"), help="'*' = every tenant"
        )
        sub.add_argument(
            "--sub-tenant-id",
            required=True,
            type=_text("--sub-tenant-id"),
            help="'*' = every sub-tenant",
        )

    partner = commands.add_parser("partner", help="create, list, rotate-secret, disable, enable")
    partner_commands = partner.add_subparsers(
        dest="partner_command", required=True, metavar="ACTION"
    )
    create = command(
        partner_commands,
        "create",
        _create,
        "Onboard a partner; prints its key, secret and webhook secret once.",
    )
    partner_arg(create)
    create.add_argument("--name", required=True, type=_text("--name"))
    create.add_argument("--rate-limit-per-minute", dest="rate_limit", type=_positive)
    command(partner_commands, "list", _list, "List partners and their grants (no secrets).")
    partner_arg(
        command(
            partner_commands,
            "rotate-secret",
            _rotate,
            "Revoke the partner's credentials and issue new ones.",
        )
    )
    partner_arg(
        command(
            partner_commands,
            "rotate-webhook-secret",
            _rotate_webhook_secret,
            "Replace the secret that signs the partner's callback_url deliveries.",
        )
    )
    partner_arg(
        command(
            partner_commands,
            "disable",
            _set_enabled,
            "Refuse every request of the partner.",
            enabled=False,
        )
    )
    partner_arg(
        command(
            partner_commands,
            "enable",
            _set_enabled,
            "Accept the partner's requests again.",
            enabled=True,
        )
    )
    limit = command(
        partner_commands,
        "set-rate-limit",
        _set_rate_limit,
        "Set the partner's requests per minute.",
    )
    partner_arg(limit)
    limit.add_argument("--per-minute", required=True, type=_positive)

    grant_args(command(commands, "grant", _grant, "Let a partner act for a tenant and sub-tenant."))
    grant_args(command(commands, "revoke", _revoke, "Withdraw a tenant grant."))
    command(commands, "list", _list, "List partners and their grants (same as 'partner list').")
    for name in ("migrate", "init-db"):
        command(commands, name, _init_db, "Create or upgrade the schema (Alembic, to head).")

    catalog = commands.add_parser(
        "catalog", help="set, list, clear: the disposition statuses a tenant accepts"
    )
    catalog_commands = catalog.add_subparsers(
        dest="catalog_command", required=True, metavar="ACTION"
    )

    def catalog_args(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        # Spelled like `grant`'s; --tenant and --sub-tenant, the first spelling, still work.
        sub.add_argument(
            "--tenant-id",
            "--tenant",
            dest="tenant",
            metavar="TENANT_ID",
            required=True,
            type=_catalog_tenant,
        )
        sub.add_argument(
            "--sub-tenant-id",
            "--sub-tenant",
            dest="sub_tenant",
            metavar="SUB_TENANT_ID",
            default=catalogs.TENANT_WIDE,
            type=_text("--sub-tenant-id"),
            help="omitted or '*': the tenant-wide catalog",
        )
        return sub

    catalog_args(
        command(
            catalog_commands,
            "set",
            _catalog_set,
            "Replace a catalog with the JSON list in --file (atomically).",
        )
    ).add_argument(
        "--file",
        required=True,
        type=_catalog_file,
        help='[{"disposition_status": ..., "label"?: ..., "final"?, "do_not_call"?, '
        '"callback"?: true|false}, ...]',
    )
    catalog_args(command(catalog_commands, "list", _catalog_list, "Print a catalog as JSON."))
    catalog_args(
        command(
            catalog_commands,
            "clear",
            _catalog_clear,
            "Remove a catalog (a sub-tenant falls back to the tenant-wide one, else any status).",
        )
    )
    webhook = commands.add_parser(
        "webhook",
        help="create, list, disable, enable, delete, rotate-secret, deliveries, replay",
    )
    webhook_commands = webhook.add_subparsers(
        dest="webhook_command", required=True, metavar="ACTION"
    )
    create_hook = command(
        webhook_commands,
        "create",
        _webhook_create,
        "Deliver a tenant's events to a URL; prints the endpoint and its secret (once).",
    )
    create_hook.add_argument("--tenant-id", required=True, type=_text("--tenant-id"))
    create_hook.add_argument(
        "--sub-tenant-id",
        required=True,
        type=_text("--sub-tenant-id"),
        help="'*' = every sub-tenant",
    )
    create_hook.add_argument("--url", required=True, help="https URL (public addresses only)")
    create_hook.add_argument(
        "--event",
        dest="events",
        action="append",
        metavar="TYPE",
        help="disposition.changed or call.processed; repeat for several (default: all)",
    )
    command(webhook_commands, "list", _webhook_list, "List endpoints (no secrets).").add_argument(
        "--tenant-id", type=_text("--tenant-id"), help="only this tenant's"
    )

    def endpoint_arg(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--id", dest="endpoint_id", required=True, help="we_…")
        return sub

    endpoint_arg(
        command(
            webhook_commands, "disable", _webhook_set_enabled, "Stop deliveries.", enabled=False
        )
    )
    endpoint_arg(
        command(
            webhook_commands,
            "enable",
            _webhook_set_enabled,
            "Resume deliveries (and forget past failures).",
            enabled=True,
        )
    )
    endpoint_arg(
        command(
            webhook_commands, "delete", _webhook_delete, "Delete an endpoint and its deliveries."
        )
    )
    endpoint_arg(
        command(
            webhook_commands,
            "rotate-secret",
            _webhook_rotate,
            "Replace the signing secret; prints the new one (once).",
        )
    )
    listing = endpoint_arg(
        command(
            webhook_commands,
            "deliveries",
            _webhook_deliveries,
            "List an endpoint's deliveries, newest first.",
        )
    )
    listing.add_argument("--status", choices=webhooks.DELIVERY_STATUSES)
    listing.add_argument("--limit", type=_positive, default=webhooks.DELIVERIES_LIMIT)
    endpoint_arg(
        command(
            webhook_commands,
            "replay",
            _webhook_replay,
            "Send deliveries again now (default: every failed one).",
        )
    ).add_argument(
        "--delivery-id", dest="delivery_ids", action="append", type=_positive, metavar="ID"
    )
    return parser


async def _run(args: argparse.Namespace, settings: Settings) -> Any:
    db = Database(settings)
    try:
        if args.run is not _init_db:  # SQLite migrates itself; PostgreSQL must be at head
            await db.prepare_schema()
        return await args.run(db, args)
    finally:
        await db.dispose()


def _database_settings(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    """The settings of the database to work on. SettingsError when there is none to use: no
    DATABASE_URL outside a checkout, or a SQLite file that does not exist (only `migrate`
    creates one)."""
    if not env.get("DATABASE_URL") and project_root() is None:
        raise SettingsError(
            "DATABASE_URL is not set and disposition-admin is not running from a project "
            "checkout; set DATABASE_URL=sqlite+aiosqlite:///PATH/disposition.db "
            "(or postgresql+asyncpg://…)"
        )
    settings = Settings.from_env(env)
    path = settings.sqlite_path()
    if path is not None and args.run is not _init_db and not path.exists():
        raise SettingsError(
            f"the database {path} does not exist yet; create it with `make run` "
            "or `disposition-admin migrate`"
        )
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _database_settings(args, os.environ)
    except SettingsError as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        result = asyncio.run(_run(args, settings))
    except partners.PartnerExists as exc:
        return _fail(f"partner {exc.args[0]!r} already exists", EXIT_EXISTS)
    except partners.UnknownPartner as exc:
        return _fail(f"no partner {exc.args[0]!r}", EXIT_NOT_FOUND)
    except webhooks.InvalidWebhook as exc:
        return _fail(str(exc), EXIT_USAGE)
    except LookupError as exc:
        return _fail(str(exc), EXIT_NOT_FOUND)
    except SchemaOutdated as exc:  # as the server: the database must be migrated first
        return _fail(str(exc), EXIT_USAGE)
    except Exception as exc:
        return _fail(f"{type(exc).__name__}: {exc}", EXIT_FAILURE)
    print(json.dumps(result, indent=2))
    return 0


def _fail(message: str, code: int) -> int:
    print(f"disposition-admin: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
