"""`python -m swarm.cli ...` runs the `swarm` command."""

import sys

from .main import main

sys.exit(main())
