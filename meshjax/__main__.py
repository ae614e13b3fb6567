"""``python -m meshjax``: the same as the ``meshjax`` command."""

from meshjax.cli import main

raise SystemExit(main())
