"""`python -m wmtp ...`: see wmtp/cli.py."""

import sys

from wmtp.cli import main

sys.exit(main())
