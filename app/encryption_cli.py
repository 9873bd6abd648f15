"""`llmaas encryption`: make a master key, rotate it, check a root. Works on the storage root directly (the
machine running it needs the root's credentials and the current master key in its environment)."""
from __future__ import annotations

import argparse
import json
import sys

from llmaas.app.storage import EncryptionKeyError, open_storage
from llmaas.app.storage.encrypted import (
    DATA_KEYS,
    MARKER,
    MASTER_KEY_FILE_ENV,
    PREVIOUS_KEY_FILE_ENV,
    CorruptObject,
    key_id,
    new_master_key,
    previous_key_from_env,
    rotate_master_key,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encryption", help="encryption at rest: new master key, rotation, status of a root")
    cmds = p.add_subparsers(dest="action", required=True)
    cmds.add_parser("new-key", help="print a new master key (base64); keep it in a file only you can read")
    for name, text in (("status", "whether a storage root is encrypted and which master keys wrap its data keys "
                                  "(exit 1 if this process cannot unwrap them all)"),
                       ("rotate", f"re-wrap every data key under {MASTER_KEY_FILE_ENV}'s key, unwrapping with "
                                  f"{PREVIOUS_KEY_FILE_ENV}'s (no data is rewritten)")):
        c = cmds.add_parser(name, help=text)
        c.add_argument("--storage-root", required=True, help="the root's path or s3:// URI")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "new-key":
            print(new_master_key())
            return 0
        storage = open_storage(args.storage_root.strip())  # an encrypted root needs this process's master key
        if not storage.encrypted:
            print(f"{storage.uri}: not encrypted")
            return 1 if args.action == "rotate" else 0
        if args.action == "rotate":
            count = rotate_master_key(storage)
            print(f"{count} data keys re-wrapped under master key {key_id(storage.keyring.master_key)}; once every "
                  f"process runs with it, unset {PREVIOUS_KEY_FILE_ENV}")
            return 0
        docs = storage.inner.list(DATA_KEYS)
        wrapped = sorted({json.loads(storage.inner.read(d)).get("master_key_id") for d in docs})
        usable = [key_id(k) for k in (storage.keyring.master_key, previous_key_from_env()) if k is not None]
        print(json.dumps({"root": storage.uri, "marker": json.loads(storage.inner.read(MARKER)),
                          "data_keys": len(docs), "wrapped_by": wrapped, "this_process_keys": usable}, indent=2))
        if missing := [k for k in wrapped if k not in usable]:
            print(f"error: data keys wrapped by master key {', '.join(missing)}, which this process does not have",
                  file=sys.stderr)
            return 1
        return 0
    except (EncryptionKeyError, CorruptObject, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
