"""``python -m meshjax``: the same as the ``meshjax`` command."""

from meshjax.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
