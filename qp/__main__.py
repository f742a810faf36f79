"""`python -m qp`: the operators' command line (see qp/cli.py)."""

import sys

from qp.cli import main

sys.exit(main())
