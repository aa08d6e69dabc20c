"""``python -m maven_dist.cli`` = ``maven``."""

import sys

from maven_dist.cli import main

sys.exit(main())
