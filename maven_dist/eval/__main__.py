"""``python -m maven_dist.eval``: alias of ``maven eval`` (``maven_dist/eval/cli.py``)."""

import sys

from maven_dist.eval.cli import main

sys.exit(main())
