"""`llmaas adapters list|register|promote|rollback|delete`, `llmaas keys create|list|revoke` and `llmaas usage`:
the service's admin HTTP API."""
from __future__ import annotations

import argparse
import json
import os
import sys

from llmaas.app.storage import is_uri


def _service_args(p: argparse.ArgumentParser, key_help: str) -> None:
    p.add_argument("--url", default=os.environ.get("LLMAAS_URL", "http://127.0.0.1:8000"),
                   help="the service (env LLMAAS_URL)")
    p.add_argument("--api-key", default=os.environ.get("LLMAAS_API_KEY"), help=f"{key_help} (env LLMAAS_API_KEY)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapters", help="list, register, promote, roll back or delete adapter versions")
    _service_args(p, "an admin key")
    cmds = p.add_subparsers(dest="action", required=True)
    cmds.add_parser("list", help="names, versions, aliases, canaries")
    reg = cmds.add_parser("register", help="register a PEFT LoRA dir (safetensors) as the next version")
    reg.add_argument("name")
    reg.add_argument("path", help="a local directory or an s3:// / gs:// prefix")
    reg.add_argument("--promote", action="store_true")
    reg.add_argument("--owner", default=None, help="tenant that owns it (default: shared)")
    pro = cmds.add_parser("promote", help="move the alias (or start a canary with --canary SHARE)")
    pro.add_argument("model", help="name@version")
    pro.add_argument("--canary", type=float, default=None)
    rb = cmds.add_parser("rollback", help="end a canary, or move the alias back")
    rb.add_argument("name")
    de = cmds.add_parser("delete", help="delete a version (not the one the alias serves)")
    de.add_argument("model", help="name@version")


def add_usage_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("usage", help="metered usage: tokens, requests, training, per tenant and model version")
    _service_args(p, "a tenant's key (its own usage) or an admin key (everyone's)")
    p.add_argument("--start", default=None, help="from (unix seconds or ISO 8601, e.g. 2026-11-01); default: all")
    p.add_argument("--end", default=None, help="until, exclusive; default: now")
    p.add_argument("--group-by", default="tenant,model", help="comma list of tenant, model, kind")
    p.add_argument("--bucket", choices=("1m", "1h", "1d"), default=None, help="also split rows by time")
    p.add_argument("--tenant", default=None, help="admins: one tenant's usage only")
    p.add_argument("--json", action="store_true", help="print the API's JSON")


def add_keys_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="create, list or revoke API keys at runtime (admin)")
    _service_args(p, "an admin key")
    cmds = p.add_subparsers(dest="action", required=True)
    new = cmds.add_parser("create", help="a new key; its secret is printed once")
    new.add_argument("--tenant", required=True)
    new.add_argument("--admin", action="store_true")
    new.add_argument("--name", default=None, help="a label for people")
    cmds.add_parser("list", help="ids, tenants, labels (never secrets)")
    rev = cmds.add_parser("revoke", help="refused on every Router from the next request on")
    rev.add_argument("key_id")


def run_keys(args: argparse.Namespace) -> int:
    if args.action == "create":
        body = _call(args, "POST", "/v1/keys", json={"tenant": args.tenant, "admin": args.admin, "name": args.name})
        if body is not None:
            print(f"{body['id']} for tenant {body['tenant']}{' (admin)' if body['admin'] else ''}; the secret, "
                  f"shown this once:\n{body['key']}")
    elif args.action == "list":
        body = _call(args, "GET", "/v1/keys")
        for k in body["data"] if body is not None else ():
            state = f"revoked {k['revoked_at']}" if k["revoked_at"] else "active"
            print(f"{k['id']}  {k['tenant']}{' admin' if k['admin'] else ''}  {k['redacted']}  {state}  "
                  f"{k['name'] or ''}".rstrip())
    else:
        body = _call(args, "DELETE", f"/v1/keys/{args.key_id}")
        if body is not None:
            print(f"{args.key_id} revoked")
    return 0 if body is not None else 1


USAGE_COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "avg_latency_ms",
                 "training_tokens", "training_compute_s")


def run_usage(args: argparse.Namespace) -> int:
    params = {k: v for k, v in {"start": args.start, "end": args.end, "group_by": args.group_by,
                                "bucket_width": args.bucket, "tenant": args.tenant}.items() if v is not None}
    body = _call(args, "GET", "/v1/usage", params=params)
    if body is None:
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    keys = (["start_time"] if args.bucket else []) + body["group_by"]
    rows = [[_cell(r.get(k)) for k in keys] + [_cell(r.get(c)) for c in USAGE_COLUMNS] for r in body["data"]]
    rows.append(["total"] + [""] * (len(keys) - 1) + [_cell(body["total"].get(c)) for c in USAGE_COLUMNS]
                if keys else [_cell(body["total"].get(c)) for c in USAGE_COLUMNS])  # .get: an older server
    header = keys + list(USAGE_COLUMNS)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in [header, *rows]:
        print("  ".join(str(x).rjust(w) if i >= len(keys) else str(x).ljust(w)
                        for i, (x, w) in enumerate(zip(line, widths))))
    return 0


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _call(args: argparse.Namespace, method: str, path: str, **kwargs):
    """The JSON answer, or None after printing the error (an API error or an unreachable service)."""
    import httpx  # the admin client's own dependency, imported only when a command runs (not by the server)

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        r = httpx.request(method, args.url.rstrip("/") + path, headers=headers, timeout=kwargs.pop("timeout", 30),
                          **kwargs)
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return None
    body = r.json()
    if r.status_code >= 400:
        print(f"error {r.status_code}: {body['error']['message']}", file=sys.stderr)
        return None
    return body


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        body = _call(args, "GET", "/v1/adapters")
    elif args.action == "register":
        body = _call(args, "POST", "/v1/adapters", timeout=120, json={
            "name": args.name, "path": args.path if is_uri(args.path) else os.path.abspath(args.path),
            "promote": args.promote, "owner": args.owner})
    elif args.action == "promote":
        name, _, version = args.model.partition("@")
        if not version.isdigit():
            print("promote takes name@version", file=sys.stderr)
            return 2
        body = _call(args, "POST", f"/v1/adapters/{name}/promote",
                     json={"version": int(version), "canary_share": args.canary})
    elif args.action == "rollback":
        body = _call(args, "POST", f"/v1/adapters/{args.name}/rollback")
    else:
        body = _call(args, "DELETE", f"/v1/adapters/{args.model}")
    if body is None:
        return 1
    if args.action == "list":
        for name, entry in sorted(body["adapters"].items()):
            versions = ", ".join(f"@{v}" for v in sorted(entry["versions"], key=int))
            canary = f" canary {entry['canary']}" if entry.get("canary") else ""
            print(f"{name}: alias @{entry['alias']}{canary}; versions {versions}; owner {entry['owner'] or 'shared'}")
    else:
        print(json.dumps(body, indent=2))
    return 0
