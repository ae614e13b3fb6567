"""The subcommands of ``meshjax``: each module has ``add_parser`` and ``run``."""
