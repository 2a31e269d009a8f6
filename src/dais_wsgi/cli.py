"""The ``dais-gateway`` command: admin tasks, serving, and the demo.

Environment and flags are read here and nowhere else: they become one
:class:`~dais_wsgi.settings.Settings`.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from dais_core.admin import AuditRecord, Role
from dais_core.errors import DaisError, InvalidData, NotFound
from dais_core.keys import ADMIN_PREFIX, TOKEN_PREFIX, key_id_of, new_key
from dais_core.policies import RatePolicy
from dais_core.rules import (
    check_grant_locations,
    check_key_details,
    check_lineage_version,
    check_methods,
    check_name,
    check_resource_id,
    check_service_url,
    check_time,
    normalise_prefix,
)
from dais_core.usecases import explain
from dais_core.values import (
    ApiKey,
    DataType,
    Grant,
    KeyRequest,
    Permission,
    ServiceEndpoint,
)
from dais_wsgi.admin import make_admin
from dais_wsgi.bootstrap import AdminStore, admin_store, bootstrap, build_storages
from dais_wsgi.present import credential_json
from dais_wsgi.settings import CPU_AFFINITY, DEFAULT_HOME, FORWARDERS, Settings

__all__ = ["main"]


#: The most gateway processes ``serve --workers`` starts.
MAX_WORKERS = 256


def _rate(text: str | None) -> RatePolicy | None:
    """Read ``N`` or ``N/SECONDS`` (optionally ``,burst=B``) as a rate policy."""
    if not text or text == "off":
        return None
    rate_text, _, burst_text = text.partition(",burst=")
    count, _, period = rate_text.partition("/")
    try:
        return RatePolicy(int(count), float(period or 1), int(burst_text or 1))
    except ValueError:
        raise InvalidData(
            "a rate reads N, N/SECONDS or N/SECONDS,burst=B (N and B whole "
            f"numbers from 1, SECONDS above 0), not {text!r}"
        ) from None


def _workers(text: str) -> int:
    if re.fullmatch("[0-9]{1,3}", text) and 1 <= int(text) <= MAX_WORKERS:
        return int(text)
    raise argparse.ArgumentTypeError(f"a number from 1 to {MAX_WORKERS}, not {text!r}")


def _cpu_affinity(text: str) -> str:
    if re.fullmatch(CPU_AFFINITY, text):
        return text
    raise argparse.ArgumentTypeError(f"auto, off or a CPU number, not {text!r}")


def _settings(args: argparse.Namespace) -> Settings:
    home = Path(args.home or os.environ.get("DAIS_HOME") or DEFAULT_HOME)
    served: dict[str, Any] = {
        "store_url": args.store or os.environ.get("DAIS_STORE", ""),
    }
    if getattr(args, "run", None) in {_serve, _demo}:
        served |= {
            "throttle_url": args.throttle
            or os.environ.get("DAIS_THROTTLE")
            or Settings().throttle_url,
            "host": args.host,
            "port": args.port,
            "threads": args.threads,
            "connection_limit": args.connection_limit,
            "reserved_threads": args.reserved_threads,
            "request_timeout": args.request_timeout,
            "shutdown_grace": args.shutdown_grace,
            "max_upload_bytes": args.max_upload_bytes,
            "uploads_in_flight": args.uploads_in_flight,
            "gateway_in_flight": args.gateway_in_flight,
            "gateway_rate": _rate(args.gateway_rate),
            "trust_forwarded": args.trust_forwarded,
            "gateway_lane": not args.no_gateway_lane,
            "connect_timeout": args.connect_timeout,
            "read_timeout": args.read_timeout,
            "forwarder": args.forwarder
            or os.environ.get("DAIS_FORWARDER")
            or Settings().forwarder,
            "cpu_affinity": getattr(args, "cpu_affinity", None)
            or os.environ.get("DAIS_CPU_AFFINITY")
            or Settings().cpu_affinity,
        }
        if args.filemanager:
            served["filemanager_root"] = Path(args.filemanager)
        upload_rate = _rate(args.upload_rate)
        if upload_rate is not None:
            served["upload_rate"] = upload_rate
    try:
        return Settings(home=home, **served)
    except ValueError as exc:
        # A value from the environment that the settings refuse.
        raise InvalidData(f"invalid configuration: {exc.args[0]}") from None


def _store(args: argparse.Namespace) -> AdminStore:
    return admin_store(_settings(args))


def _audit(store: AdminStore, action: str, target: str, **detail: Any) -> None:
    """Record a change made on the command line, as the admin API records its own.

    The actor is ``cli:<login name>``: whoever can run these commands holds
    the store itself, with no admin token to name.
    """
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    store.record_audit(AuditRecord(time.time(), f"cli:{user}", action, target, detail))


def _keys_create(args: argparse.Namespace) -> int:
    check_name(args.project, "project")
    made = new_key()
    now = time.time()
    expires = None
    if args.expires_days is not None:
        if not args.expires_days > 0:
            raise InvalidData("--expires-days must be a number of days above 0")
        expires = check_time(now + args.expires_days * 86400)
    request = KeyRequest(
        requestor=args.requestor,
        approver=args.approver,
        app_ids=tuple(args.app_id or (args.project,)),
        case_code=args.case_code,
        lighthouse=args.lighthouse,
        business_case=args.business_case,
    )
    check_key_details(args.label, request)
    key = ApiKey(
        made.id, made.secret_hash, args.project, args.label, request, now, expires
    )
    store = _store(args)
    store.add_key(key)
    _audit(store, "key.create", made.id, project=args.project, label=args.label)
    if args.json:
        print(json.dumps({"id": made.id, "key": made.token}))
    else:
        print(f"key id: {made.id}\nkey:    {made.token}\n(the key is shown only now)")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    now = time.time()
    found = [credential_json(c, now) for c in _store(args).list_keys(args.project)]
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        for item in found:
            state = item["state"]
            print(f"{item['id']}  {item['project']:<20} {state:<8} {item['label']}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    store = _store(args)
    store.revoke(args.key_id, time.time())
    _audit(store, "key.revoke", args.key_id)
    print(f"revoked {args.key_id}")
    return 0


def _permissions_add(args: argparse.Namespace) -> int:
    permission = Permission(
        check_name(args.project, "project"),
        check_name(args.service, "service"),
        normalise_prefix(args.prefix),
        check_methods(args.method or ()),
    )
    store = _store(args)
    store.add_permission(args.key_id, permission)
    _audit(store, "permission.add", args.key_id, prefix=permission.prefix)
    print(
        f"{args.key_id} may call {permission.project}/{permission.service}{permission.prefix}"
    )
    return 0


def _grants_add(args: argparse.Namespace) -> int:
    resource = check_resource_id(args.resource, allow_prefix=True)
    schemes = build_storages(_settings(args)).keys()
    locations = check_grant_locations(resource, args.to, schemes)
    grant = Grant(resource, locations, DataType(args.type))
    store = _store(args)
    store.add_grant(args.key_id, grant)
    _audit(store, "grant.add", args.key_id, resource=resource)
    print(f"{args.key_id} may publish {resource} to {', '.join(locations)}")
    return 0


def _services_add(args: argparse.Namespace) -> int:
    endpoint = ServiceEndpoint(
        check_name(args.project, "project"),
        check_lineage_version(args.lineage_version),
        check_name(args.service, "service"),
        check_service_url(args.url),
    )
    store = _store(args)
    store.add_service(endpoint)
    _audit(store, "service.add", f"{endpoint.project}/{endpoint.service}")
    print(
        f"{endpoint.project} v{endpoint.lineage_version} {endpoint.service} -> {endpoint.base_url}"
    )
    return 0


def _services_remove(args: argparse.Namespace) -> int:
    project = check_name(args.project, "project")
    version = check_lineage_version(args.lineage_version)
    service = check_name(args.service, "service")
    store = _store(args)
    store.remove_service(project, version, service)
    _audit(store, "service.remove", f"{project}/{service}", lineage_version=version)
    print(f"{project} v{version} {service} removed")
    return 0


def _admins_create(args: argparse.Namespace) -> int:
    role = Role(args.role)
    if role is Role.PROJECT and not args.project:
        raise InvalidData("a project admin needs --project")
    store = _store(args)
    created = make_admin(store, role, args.project, args.label, time.time())
    _audit(store, "admin.create", created["id"], project=args.project)
    if args.json:
        print(json.dumps(created))
    else:
        print(
            f"admin id: {created['id']}\ntoken:    {created['token']}\n(shown only now)"
        )
    return 0


def _admins_revoke(args: argparse.Namespace) -> int:
    store = _store(args)
    store.revoke_admin(args.admin_id, time.time())
    _audit(store, "admin.revoke", args.admin_id)
    print(f"revoked admin token {args.admin_id}")
    return 0


def _key_id(text: str, prefix: str = TOKEN_PREFIX) -> str:
    """Read a key id, taking it from a whole key pasted in its place."""
    try:
        return key_id_of(text, prefix)
    except InvalidData as exc:
        # Not ValueError: argparse would repeat the value, a secret maybe.
        raise argparse.ArgumentTypeError(exc.message) from None


def _admin_id(text: str) -> str:
    """Read an admin token's id, taking it from a whole token pasted for it."""
    return _key_id(text, ADMIN_PREFIX)


def _explain(args: argparse.Namespace) -> int:
    store = _store(args)
    credential = store.load(args.key_id)
    if credential is None:
        raise NotFound(f"no key {args.key_id!r}")
    found = explain(credential, args.method, args.url, store, time.time())
    if args.json:
        print(json.dumps(attrs.asdict(found, value_serializer=_plain)))
    else:
        verdict = "allowed" if found.allowed else "refused"
        print(f"{verdict} ({found.status}): {found.reason}")
        print(f"normalised route: {found.route or '-'}")
        for line in found.considered:
            print(f"  permission {line}")
        if found.permission is not None:
            p = found.permission
            methods = ",".join(sorted(p.methods)) or "any method"
            print(f"matched permission: {p.project} {p.service} {p.prefix} ({methods})")
            print(
                f"lineage version: {found.lineage_version}; upstream: {found.upstream}"
            )
    return 0 if found.allowed else 1


def _plain(instance: Any, field: Any, value: Any) -> Any:
    return sorted(value) if isinstance(value, frozenset) else value


def _serve(args: argparse.Namespace) -> int:
    from dais_wsgi.affinity import choose_cpu, pin
    from dais_wsgi.server import Sweeper, make_server, run_until, stop_on_signals
    from dais_wsgi.workers import die_with_parent, serve_workers

    settings = _settings(args)
    if args.workers > 1:
        return serve_workers(settings, args.argv, args.workers)
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    cpu = choose_cpu(settings.cpu_affinity)
    if cpu is not None:
        # Before any thread starts: threads inherit the affinity.
        pin(cpu)
    runtime = bootstrap(settings)
    sockets = []
    if args.listen_fd is not None:
        sockets = [socket.socket(fileno=args.listen_fd)]
    try:
        server = (
            make_server(runtime, sockets=sockets) if sockets else make_server(runtime)
        )
    except (OSError, ValueError) as exc:
        # ValueError: waitress could not read the address at all.
        runtime.close()
        reason = exc.strerror if isinstance(exc, OSError) else exc.args[0]
        raise InvalidData(
            f"cannot listen on {args.host}:{args.port}: {reason}"
        ) from exc
    stopping = stop_on_signals(server)
    sweeper = Sweeper(runtime).start()
    try:
        print(f"dais gateway on http://{args.host}:{server.effective_port}", flush=True)
        run_until(server, stopping, settings.shutdown_grace)
    finally:
        sweeper.stop()
        runtime.close()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dais_wsgi.demo import run_demo

    return run_demo(_settings(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dais-gateway", description="Dais external integration gateway."
    )
    parser.add_argument("--home", help="state folder (default: $DAIS_HOME or ./.dais)")
    parser.add_argument(
        "--store",
        help="key store URL: sqlite:///path or postgresql://... "
        "(default: $DAIS_STORE or a SQLite file in the home folder)",
    )
    groups = parser.add_subparsers(dest="group", required=True)

    keys = groups.add_parser("keys", help="API keys").add_subparsers(
        dest="action", required=True
    )
    create = keys.add_parser("create", help="create a key; the secret is shown once")
    create.add_argument("--project", required=True)
    create.add_argument("--label", default="")
    create.add_argument("--requestor", default="")
    create.add_argument("--approver", default="")
    create.add_argument("--app-id", action="append", help="app id (repeatable)")
    create.add_argument("--case-code", default="")
    create.add_argument("--lighthouse", action="store_true")
    create.add_argument("--business-case", default="")
    create.add_argument(
        "--expires-days",
        type=float,
        help="days until the key expires (never, if left out)",
    )
    create.add_argument("--json", action="store_true")
    create.set_defaults(run=_keys_create)
    listing = keys.add_parser("list", help="list keys, never their secrets")
    listing.add_argument("--project")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key now")
    revoke.add_argument("key_id", type=_key_id, help="a key id, or the whole key")
    revoke.set_defaults(run=_keys_revoke)

    perms = groups.add_parser("permissions", help="gateway permissions").add_subparsers(
        dest="action", required=True
    )
    padd = perms.add_parser("add", help="let a key call a service under a route prefix")
    padd.add_argument("key_id", type=_key_id, help="a key id, or the whole key")
    padd.add_argument("--project", required=True)
    padd.add_argument("--service", required=True)
    padd.add_argument("--prefix", required=True)
    padd.add_argument(
        "--method", action="append", help="restrict to a method (repeatable)"
    )
    padd.set_defaults(run=_permissions_add)

    grants = groups.add_parser("grants", help="resource grants").add_subparsers(
        dest="action", required=True
    )
    gadd = grants.add_parser("add", help="let a key publish a resource to locations")
    gadd.add_argument("key_id", type=_key_id, help="a key id, or the whole key")
    gadd.add_argument("--resource", required=True)
    gadd.add_argument(
        "--to", action="append", required=True, help="location (repeatable)"
    )
    gadd.add_argument("--type", choices=[t.value for t in DataType], default="binary")
    gadd.set_defaults(run=_grants_add)

    services = groups.add_parser("services", help="service registry").add_subparsers(
        dest="action", required=True
    )
    sadd = services.add_parser("add", help="register a service of a lineage version")
    sadd.add_argument("--project", required=True)
    sadd.add_argument("--lineage-version", type=int, required=True)
    sadd.add_argument("--service", required=True)
    sadd.add_argument("--url", required=True)
    sadd.set_defaults(run=_services_add)
    sremove = services.add_parser(
        "remove", help="take a service of a lineage version out of the registry"
    )
    sremove.add_argument("--project", required=True)
    sremove.add_argument("--lineage-version", type=int, required=True)
    sremove.add_argument("--service", required=True)
    sremove.set_defaults(run=_services_remove)

    admins = groups.add_parser("admins", help="admin tokens").add_subparsers(
        dest="action", required=True
    )
    acreate = admins.add_parser("create", help="create an admin token; shown once")
    acreate.add_argument("--role", choices=[r.value for r in Role], required=True)
    acreate.add_argument("--project", help="the project of a project admin")
    acreate.add_argument("--label", default="")
    acreate.add_argument("--json", action="store_true")
    acreate.set_defaults(run=_admins_create)
    arevoke = admins.add_parser("revoke", help="revoke an admin token now")
    arevoke.add_argument(
        "admin_id", type=_admin_id, help="an admin token's id, or the whole token"
    )
    arevoke.set_defaults(run=_admins_revoke)

    explainer = groups.add_parser(
        "explain", help="say whether a key may make a gateway call, and why"
    )
    explainer.add_argument("key_id", type=_key_id, help="a key id, or the whole key")
    explainer.add_argument("method")
    explainer.add_argument("url", help="the gateway URL (or just its path)")
    explainer.add_argument("--json", action="store_true")
    explainer.set_defaults(run=_explain)

    defaults = Settings()
    for name, run, text in (
        ("serve", _serve, "serve the gateway"),
        ("demo", _demo, "serve the gateway with a sample service and demo key"),
    ):
        command = groups.add_parser(name, help=text)
        command.add_argument("--host", default=defaults.host)
        command.add_argument("--port", type=int, default=defaults.port)
        command.add_argument("--threads", type=int, default=defaults.threads)
        command.add_argument(
            "--connection-limit",
            type=int,
            default=defaults.connection_limit,
            help="connections held open at once (default %(default)s)",
        )
        command.add_argument(
            "--reserved-threads",
            type=int,
            default=defaults.reserved_threads,
            help="worker threads webhook calls and uploads never hold, kept for "
            "health checks and admin calls (default %(default)s)",
        )
        command.add_argument("--filemanager", help="File Manager folder")
        command.add_argument(
            "--request-timeout", type=float, default=defaults.request_timeout
        )
        command.add_argument(
            "--shutdown-grace",
            type=float,
            default=defaults.shutdown_grace,
            help="seconds a stop leaves the requests in flight to be answered "
            "(default %(default)s)",
        )
        command.add_argument(
            "--max-upload-bytes", type=int, default=defaults.max_upload_bytes
        )
        command.add_argument(
            "--upload-rate", help="uploads per key: N, N/SECONDS[,burst=B]"
        )
        command.add_argument(
            "--uploads-in-flight", type=int, default=defaults.uploads_in_flight
        )
        command.add_argument(
            "--gateway-rate", help="webhook calls per key (default: off)"
        )
        command.add_argument(
            "--gateway-in-flight",
            type=int,
            default=defaults.gateway_in_flight,
            help="webhook calls a key may have in flight at once (0: no cap)",
        )
        command.add_argument("--trust-forwarded", action="store_true")
        command.add_argument(
            "--no-gateway-lane",
            action="store_true",
            help="forward every webhook call from a worker thread, none from "
            "the event loop",
        )
        command.add_argument(
            "--connect-timeout",
            type=float,
            default=defaults.connect_timeout,
            help="seconds to wait for an upstream to accept a connection",
        )
        command.add_argument(
            "--read-timeout",
            type=float,
            default=defaults.read_timeout,
            help="seconds an upstream may stall while answering",
        )
        command.add_argument(
            "--forwarder",
            choices=FORWARDERS,
            help="HTTP client for webhook calls (default: $DAIS_FORWARDER or "
            f"{defaults.forwarder})",
        )
        if name == "serve":
            command.add_argument(
                "--cpu-affinity",
                type=_cpu_affinity,
                help="keep the server on one CPU: auto, off or a CPU number "
                "(default: $DAIS_CPU_AFFINITY or auto)",
            )
            command.add_argument(
                "--workers",
                type=_workers,
                default=1,
                help="gateway processes sharing the port (needs --throttle redis://)",
            )
            command.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
            command.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
        command.add_argument(
            "--throttle",
            help="throttle state URL: memory:// or redis://host:port/db "
            "(default: $DAIS_THROTTLE or memory://)",
        )
        command.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    level = os.environ.get("DAIS_LOG_LEVEL", "INFO").strip().upper()
    try:
        logging.basicConfig(
            level=level,
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
            stream=sys.stderr,
        )
    except ValueError:
        print(
            f"dais-gateway: invalid configuration: DAIS_LOG_LEVEL is {level!r}; "
            "use DEBUG, INFO, WARNING, ERROR or CRITICAL",
            file=sys.stderr,
        )
        return 2
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code: int = args.run(args)
        sys.stdout.flush()
    except DaisError as exc:
        print(f"dais-gateway: {exc.message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (``keys list | head``): say nothing more, and
        # keep the interpreter from failing to flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
