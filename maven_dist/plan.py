"""``python -m maven_dist.plan``: alias of ``maven plan`` (``maven_dist/parallel/memory_plan.py``)."""

import sys

from maven_dist.parallel.memory_plan import main

if __name__ == "__main__":
    sys.exit(main())
