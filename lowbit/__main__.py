"""Command line: ``python -m lowbit --help`` (the ``lowbit`` console script); see ``lowbit/cli``."""

from __future__ import annotations

import sys

from lowbit.cli import main

if __name__ == "__main__":
    sys.exit(main())
