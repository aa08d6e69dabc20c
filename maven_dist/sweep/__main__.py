"""``python -m maven_dist.sweep``: the same as ``maven sweep``."""

import sys

from maven_dist.sweep.cli import main

sys.exit(main())
