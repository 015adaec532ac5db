"""The `lmforge` command line."""

from __future__ import annotations

import argparse
import sys

from lmforge.api.validation import InvalidObject, load_file


def cmd_validate(args: argparse.Namespace) -> int:
    """Check YAML files against the LMForge API without a cluster."""
    status = 0
    for file in args.files:
        try:
            objects = load_file(file)
        except InvalidObject as err:
            print(err.render(), file=sys.stderr)
            status = 1
            continue
        for obj in objects:
            print(f"{file}: {obj.kind}/{obj.name or '<unnamed>'} is valid")
    return status


def cmd_demo(args: argparse.Namespace) -> int:
    """The newcomer's first run."""
    print(
        "The LMForge demo fine-tunes a tiny locally built model with `lmforge run`.\n"
        "The trainer is not in this build yet; meanwhile try:\n"
        "  lmforge validate examples/*.yaml\n"
        "  make cluster-up && kubectl --kubeconfig .lmforge/cluster/kubeconfig apply -f crds/"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Kubernetes-native fine-tuning, alignment and serving of open LLMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser(
        "validate", help="validate FinetuneJob/AlignmentJob/InferenceService YAML"
    )
    validate.add_argument(
        "files", nargs="+", help="YAML files (several documents per file allowed)"
    )
    validate.set_defaults(func=cmd_validate)
    demo = sub.add_parser("demo", help="run the newcomer's demo")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
