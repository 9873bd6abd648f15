"""`llmaas encryption`: make a master key, rotate it, check a root. Works on the storage root directly (the
machine running it needs the root's credentials and the current master key in its environment)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmaas.app.storage import EncryptionKeyError, open_storage
from llmaas.app.storage.encrypted import (
    DATA_KEYS,
    MARKER,
    MASTER_KEY_FILE_ENV,
    key_id,
    new_master_key,
    parse_master_key,
    rotate_master_key,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encryption", help="encryption at rest: new master key, rotation, status of a root")
    cmds = p.add_subparsers(dest="action", required=True)
    cmds.add_parser("new-key", help="print a new master key (base64); keep it in a file only you can read")
    for name, text in (("status", "whether a storage root is encrypted and which master key wraps its data keys"),
                       ("rotate", "re-wrap every data key of a root under a new master key (no data is rewritten)")):
        c = cmds.add_parser(name, help=text)
        c.add_argument("--storage-root", required=True, help="the root's path or s3:// URI")
        if name == "rotate":
            c.add_argument("--new-key-file", required=True,
                           help=f"the new key; the current one comes from {MASTER_KEY_FILE_ENV}")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "new-key":
            print(new_master_key())
            return 0
        storage = open_storage(args.storage_root.strip())  # an encrypted root needs this process's master key
        if not storage.encrypted:
            print(f"{storage.uri}: not encrypted")
            return 1 if args.action == "rotate" else 0
        old = storage.keyring.master_key
        if args.action == "rotate":
            new = parse_master_key(Path(args.new_key_file).read_bytes(), args.new_key_file)
            count = rotate_master_key(storage.inner, old, new)
            print(f"{count} data keys re-wrapped from master key {key_id(old)} to {key_id(new)}; now give every "
                  f"process {MASTER_KEY_FILE_ENV}={args.new_key_file}")
            return 0
        docs = storage.inner.list(DATA_KEYS)
        print(json.dumps({"root": storage.uri, "marker": json.loads(storage.inner.read(MARKER)),
                          "data_keys": len(docs),
                          "wrapped_by": sorted({json.loads(storage.inner.read(d))["master_key_id"] for d in docs}),
                          "this_process_key": key_id(old)}, indent=2))
        return 0
    except (EncryptionKeyError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
