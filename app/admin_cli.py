"""`llmaas adapters list|register|promote|rollback|delete`: the registry over the admin HTTP API."""
from __future__ import annotations

import argparse
import json
import os
import sys

from llmaas.app.storage import is_uri


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapters", help="list, register, promote, roll back or delete adapter versions")
    p.add_argument("--url", default=os.environ.get("LLMAAS_URL", "http://127.0.0.1:8000"),
                   help="the service (env LLMAAS_URL)")
    p.add_argument("--api-key", default=os.environ.get("LLMAAS_API_KEY"), help="an admin key (env LLMAAS_API_KEY)")
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


def run(args: argparse.Namespace) -> int:
    import httpx  # the admin client's own dependency, imported only when the command runs (not by the server)

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.url.rstrip("/")
    if args.action == "list":
        r = httpx.get(f"{base}/v1/adapters", headers=headers, timeout=30)
    elif args.action == "register":
        r = httpx.post(f"{base}/v1/adapters", headers=headers, timeout=120,
                       json={"name": args.name, "path": args.path if is_uri(args.path) else os.path.abspath(args.path),
                             "promote": args.promote, "owner": args.owner})
    elif args.action == "promote":
        name, _, version = args.model.partition("@")
        if not version.isdigit():
            print("promote takes name@version", file=sys.stderr)
            return 2
        r = httpx.post(f"{base}/v1/adapters/{name}/promote", headers=headers, timeout=30,
                       json={"version": int(version), "canary_share": args.canary})
    elif args.action == "rollback":
        r = httpx.post(f"{base}/v1/adapters/{args.name}/rollback", headers=headers, timeout=30)
    else:
        r = httpx.delete(f"{base}/v1/adapters/{args.model}", headers=headers, timeout=30)
    body = r.json()
    if r.status_code >= 400:
        print(f"error {r.status_code}: {body['error']['message']}", file=sys.stderr)
        return 1
    if args.action == "list":
        for name, entry in sorted(body["adapters"].items()):
            versions = ", ".join(f"@{v}" for v in sorted(entry["versions"], key=int))
            canary = f" canary {entry['canary']}" if entry.get("canary") else ""
            print(f"{name}: alias @{entry['alias']}{canary}; versions {versions}; owner {entry['owner'] or 'shared'}")
    else:
        print(json.dumps(body, indent=2))
    return 0
