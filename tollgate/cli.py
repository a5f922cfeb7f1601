"""The `tollgate` command."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from tollgate.logs import configure as configure_logs
from tollgate.settings import Settings


def _settings(args) -> Settings:
    overrides = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = Path(args.data_dir)
    return Settings(**overrides)


def cmd_up(args) -> int:
    from tollgate.stack import up

    s = _settings(args)
    return up(s, args.host or s.api_host, args.port or s.api_port, ingest_workers=args.ingest_workers)


def cmd_migrate(args) -> int:
    from warehouse.client import connect
    from warehouse.migrate import migrate

    s = _settings(args)
    if s.clickhouse_cluster and s.is_embedded_warehouse:
        print("error: TOLLGATE_CLICKHOUSE_CLUSTER needs a ClickHouse server DSN, not the embedded warehouse",
              file=sys.stderr)
        return 2
    applied = migrate(connect(s.warehouse_dsn), s.retention_days, audit_retention_days=s.audit_retention_days,
                      cluster=s.clickhouse_cluster)
    print(f"{len(applied)} migration(s) applied" + (": " + ", ".join(applied) if applied else ""))
    return 0


def cmd_settle(args) -> int:
    from warehouse.client import chdb_path, connect
    from warehouse.settle import settle

    s = _settings(args)
    if s.is_embedded_warehouse and not Path(chdb_path(s.warehouse_dsn)).is_dir():  # connect() would create one
        print(f"error: no embedded warehouse at {chdb_path(s.warehouse_dsn)} (nothing to settle)", file=sys.stderr)
        return 1
    done = settle(connect(s.warehouse_dsn), max_days=args.max_days or s.settle_max_days)
    print(f"settled {len(done)} day(s)" + (": " + ", ".join(str(d.day) for d in done) if done else ""))
    return 0


def cmd_ingest(args) -> int:
    from tollgate.stack import run_ingest

    return run_ingest(_settings(args), workers=args.workers)


def cmd_api(args) -> int:
    from tollgate.stack import run_api

    s = _settings(args)
    return run_api(s, args.host or s.api_host, args.port or s.api_port)


def cmd_scheduler(args) -> int:
    from tollgate.stack import run_scheduler

    if args.command == "limits":
        print("note: `tollgate limits` is now `tollgate scheduler` (the limits job, settle and export schedules, "
              "under the scheduler lease)", file=sys.stderr)
    return run_scheduler(_settings(args))  # a held data dir: main() prints the error


def cmd_keys_create(args) -> int:
    from analytics_api.auth import SCOPES, hash_key, new_key, validate_scopes
    from warehouse.client import connect
    from warehouse.migrate import migrate
    from warehouse.queries import api_keys

    s = _settings(args)
    if not args.org.strip():
        print("error: --org: an organisation id is required (not empty)", file=sys.stderr)
        return 2
    try:
        scopes = validate_scopes([x.strip() for x in args.scopes.split(",") if x.strip()]) if args.scopes else list(SCOPES)
    except ValueError as exc:
        print(f"error: --scopes: {exc}", file=sys.stderr)
        return 2
    client = connect(s.warehouse_dsn)  # a held data dir: main() prints the error
    # the retention TTLs too, as `tollgate migrate` sets them: a pending 0015 rebuilds generations without one
    migrate(client, s.retention_days, audit_retention_days=s.audit_retention_days, cluster=s.clickhouse_cluster)
    key = new_key()
    row = api_keys.insert(
        client, key_hash=hash_key(key), organisation_id=args.org, workspace_slug=args.workspace or "",
        scopes=scopes, name=args.name or "",
    )
    kind = f"workspace '{args.workspace}'" if args.workspace else "organisation"
    print(f"created {kind} key {row.id} for organisation '{args.org}' with scopes {','.join(scopes)}")
    print("the key is shown once:")
    print(key)
    return 0


def cmd_seed(args) -> int:
    from ingest.producer import make_producer
    from tollgate.seed import publish
    from tollgate.stack import kafka_bootstrap

    s = _settings(args)
    producer = make_producer(kafka_bootstrap(s))
    counts = publish(
        producer, s, events=args.events, days=args.days, org=args.org or s.default_organisation,
        workspace=args.workspace or s.default_workspace, seed=args.seed,
    )
    producer.close()
    print(f"published {counts['gateway_logs']} gateway logs and {counts['feedback']} feedback events")
    if counts["last_log_id"]:
        print(f"last log id: {counts['last_log_id']}  (GET /v1/logs/{counts['last_log_id']})")
    return 0


def cmd_pricing_refresh(args) -> int:
    from ingest.pricing import BUNDLED_DIR
    from ingest.pricing_refresh import refresh, refresh_from_upstream

    target = Path(args.to) if args.to else BUNDLED_DIR
    try:
        done = refresh(Path(args.source), target) if args.source else refresh_from_upstream(target)
    except (ValueError, OSError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}; the pricing table was not changed", file=sys.stderr)
        return 1
    print(f"pricing table refreshed: Portkey-AI/models {done.version} ({done.date}), {done.files} files, "
          f"{done.models} priced models, into {target}; restart running processes to use it")
    return 0


def cmd_export(args) -> int:
    from exports.shell import run

    return run(args, _settings(args))


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tollgate", description=__doc__)
    p.add_argument("--log-level", default="WARNING", help="Python log level (default WARNING)")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole embedded stack in one process")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.add_argument("--data-dir")
    up.add_argument("--ingest-workers", type=_at_least(1), help="ingest worker processes, each one consumer per topic "
                    "(default TOLLGATE_INGEST_WORKERS)")
    up.set_defaults(func=cmd_up)

    m = sub.add_parser("migrate", help="apply pending warehouse migrations")
    m.add_argument("--data-dir")
    m.set_defaults(func=cmd_migrate)

    st = sub.add_parser("settle", help="merge each ended day of generations into one part (cheap FINAL reads)")
    st.add_argument("--max-days", type=_at_least(1), help="settle at most this many days, newest first "
                    "(default TOLLGATE_SETTLE_MAX_DAYS)")
    st.add_argument("--data-dir")
    st.set_defaults(func=cmd_settle)

    i = sub.add_parser("ingest", help="run ingest consumers only (production role)")
    i.add_argument("--workers", type=_at_least(1), help="worker processes (default TOLLGATE_INGEST_WORKERS)")
    i.add_argument("--data-dir")
    i.set_defaults(func=cmd_ingest)

    a = sub.add_parser("api", help="run the API only (production role)")
    a.add_argument("--host")
    a.add_argument("--port", type=int)
    a.add_argument("--data-dir")
    a.set_defaults(func=cmd_api)

    sc = sub.add_parser("scheduler", help="run the scheduled jobs while holding the scheduler lease (production role)")
    sc.add_argument("--data-dir")
    sc.set_defaults(func=cmd_scheduler)

    lim = sub.add_parser("limits", help="an alias of `scheduler` (the limits job is one of its jobs)")
    lim.add_argument("--data-dir")
    lim.set_defaults(func=cmd_scheduler)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    kc = keys.add_parser("create", help="create an API key; the key is the last line of output")
    kc.add_argument("--org", required=True)
    kc.add_argument("--workspace")
    kc.add_argument("--scopes", help="comma-separated; default: all scopes")
    kc.add_argument("--name")
    kc.add_argument("--data-dir")
    kc.set_defaults(func=cmd_keys_create)

    sd = sub.add_parser("seed", help="publish deterministic synthetic gateway traffic to Kafka")
    sd.add_argument("--events", type=_at_least(1), default=10_000)
    sd.add_argument("--days", type=_positive_float, default=7)
    sd.add_argument("--org")
    sd.add_argument("--workspace")
    sd.add_argument("--seed", type=int, default=0)
    sd.add_argument("--data-dir")
    sd.set_defaults(func=cmd_seed)

    pricing = sub.add_parser("pricing", help="the bundled model pricing table").add_subparsers(
        dest="pricing_command", required=True)
    pr = pricing.add_parser("refresh", help="replace it with a Portkey-AI/models checkout (default: clone it)")
    pr.add_argument("--from", dest="source", help="a Portkey-AI/models checkout, or a directory of its pricing/*.json")
    pr.add_argument("--to", help="the pricing data directory to update (default: the bundled ingest/pricing_data)")
    pr.set_defaults(func=cmd_pricing_refresh)

    from exports.shell import add_parser as add_export_parser

    add_export_parser(sub)  # tollgate export create|start|status|download
    sub.choices["export"].set_defaults(func=cmd_export)
    return p


# Roles that run until a signal and may hold the embedded engine. They shut down in
# order themselves (drain, insert, commit, close); then the process ends without the
# interpreter's teardown, in which chdb's exit-time shutdown has failed ("The
# ShutdownTablesThreadPool is not initialized") and turned a clean stop into exit 1.
SERVICE_COMMANDS = {"up", "ingest", "api", "scheduler", "limits"}


def _operator_errors() -> tuple[type[BaseException], ...]:
    """What an operator's mistake raises (settings, a held data dir, an edited migration, a busy port):
    an `error:` line, not a traceback."""
    from pydantic import ValidationError

    from warehouse.client import WarehouseUnavailable
    from warehouse.migrate import MigrationError

    return ValidationError, WarehouseUnavailable, MigrationError, OSError


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not isinstance(logging.getLevelName(args.log_level.upper()), int):
        p.error(f"--log-level: unknown level {args.log_level!r} (DEBUG, INFO, WARNING, ERROR)")
    try:
        configure_logs(args.log_level, Settings().log_format)
        code = args.func(args)
    except _operator_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception:
        if args.command not in SERVICE_COMMANDS:
            raise
        logging.getLogger(__name__).exception("tollgate %s failed", args.command)  # then out through os._exit, as on a clean stop
        code = 1
    if args.command in SERVICE_COMMANDS:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
