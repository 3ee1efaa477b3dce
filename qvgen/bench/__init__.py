"""QVGen benchmarks: `python -m qvgen.bench <command>`.

Each command is a module of this package listed in `__main__.SUBCOMMANDS` that provides

- `HELP: str` — one line for `--help`;
- `add_arguments(parser: argparse.ArgumentParser) -> None`;
- `run(args: argparse.Namespace) -> int` — the exit status.

Commands: `kernels` (the quantized linear layer against the float matmul baseline).
"""
