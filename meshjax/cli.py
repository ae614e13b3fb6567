"""The ``meshjax`` command: one subcommand per module in :mod:`meshjax.commands`.

Example::

    $ meshjax plan                                   # gpt-tiny, 4x2 (data, model), train, verified
    $ meshjax plan gpt3-175b --mesh 8x8 --hardware h100-2node --memory-limit 80GB --no-verify \
          --set batch=4,dtype=bfloat16,scan_layers=true

Each command module has ``add_parser(subparsers)`` and ``run(args) -> int``. Simulated CPU
devices must be configured before JAX starts a backend, so commands parse their arguments and
call ``use_cpu_devices`` before anything asks JAX for devices.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence

from meshjax.errors import MeshjaxError

COMMANDS = ("plan", "compare", "train", "launch")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other meshjax error.

    A value that starts with ``-`` and a digit (``--memory-limit -5GB``, ``--lr -1``) is read as
    the option's value, so the check of that value can say what is wrong with it. ``lazy_epilog``
    (a function) builds text shown under ``--help`` only when help is printed.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")
        self.lazy_epilog = None

    def format_help(self) -> str:
        if self.lazy_epilog is not None and self.epilog is None:
            self.epilog = self.lazy_epilog()
        return super().format_help()

    def error(self, message: str):
        print(f"meshjax: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    from meshjax import __version__

    parser = _Parser(prog="meshjax", description="Plan, lower and check sharding layouts for JAX meshes.")
    parser.add_argument("--version", action="version", version=f"meshjax {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"meshjax.commands.{name}").add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["plan"]
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    try:
        return importlib.import_module(f"meshjax.commands.{args.command}").run(args)
    except (MeshjaxError, OSError) as err:
        print(f"meshjax: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
