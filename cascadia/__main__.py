"""`python -m cascadia` runs the CLI (same as the `cascadia` console script)."""

import sys

from cascadia.cli import main

sys.exit(main())
