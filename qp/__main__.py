"""`python -m qp`: the operators' command line (see qp/cli/)."""

import sys

from qp.cli.main import main

sys.exit(main())
