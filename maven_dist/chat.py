"""``python -m maven_dist.chat``: alias of ``maven chat`` (``maven_dist/inference/chat.py``)."""

import sys

from maven_dist.inference.chat import main

if __name__ == "__main__":
    sys.exit(main())
