"""The subcommands of ``meshjax``: each module has ``add_parser`` and ``run``."""

import os
import sys
from typing import Any

# Wide enough for the plan and cost tables; rich would otherwise wrap them at 80 columns whenever
# the output is not a terminal (a pipe, a file, CI logs).
PIPE_WIDTH = 200


def console(stderr: bool = False, **kwargs: Any):
    """A rich console for a subcommand's output: the terminal's width on a terminal, ``$COLUMNS``
    if set, else :data:`PIPE_WIDTH`."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else PIPE_WIDTH
    return Console(stderr=stderr, width=width, **kwargs)
