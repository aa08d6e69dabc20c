"""`python tools/make_synthetic.py ...`: alias of `maven synthetic ...` (see `maven synthetic --help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from maven_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["synthetic", *sys.argv[1:]]))
