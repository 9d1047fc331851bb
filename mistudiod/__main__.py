"""`python -m mistudiod`: the daemon (the same as the `mistudiod` console script)."""

import sys

from mistudiod.server import main

sys.exit(main())
