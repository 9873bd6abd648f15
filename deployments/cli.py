"""The `llmaas` command line: prepare (convert the default model), finetune, adapters, keys, usage,
encryption."""
from __future__ import annotations

import argparse
import sys

from llmaas.app import admin_cli, encryption_cli
from llmaas.training import cli as training_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmaas", description="LLM-as-a-service on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="convert and cache the default model (done on first serve otherwise)")
    prep.add_argument("--cache-dir", default=None)
    training_cli.add_parser(sub)
    admin_cli.add_parser(sub)
    admin_cli.add_keys_parser(sub)
    admin_cli.add_usage_parser(sub)
    encryption_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "finetune":
        return training_cli.run(args)
    if args.command == "adapters":
        return admin_cli.run(args)
    if args.command == "usage":
        return admin_cli.run_usage(args)
    if args.command == "encryption":
        return encryption_cli.run(args)
    if args.command == "keys":
        return admin_cli.run_keys(args)
    if args.command == "prepare":
        # torch and transformers load for this command only (see training.cli.run)
        from llmaas.app.config import ModelSettings
        from llmaas.app.model_source import resolve_model

        settings = ModelSettings() if args.cache_dir is None else ModelSettings(cache_dir=args.cache_dir)
        model = resolve_model(settings)
        print(f"{model.served_name}: {model.path} (context {model.max_model_len})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
