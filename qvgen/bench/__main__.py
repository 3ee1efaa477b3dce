"""Command-line entry point of the benchmarks; one argparse subcommand per module."""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module; a module that does not exist yet is simply not offered
SUBCOMMANDS = {
    "comfy": "qvgen.bench.comfy",
    "kernels": "qvgen.bench.kernels_cli",
    "train": "qvgen.bench.train",
    "step": "qvgen.bench.step",
    "native": "qvgen.bench.native",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qvgen.bench", description="QVGen benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue
            raise
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
