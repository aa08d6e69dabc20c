"""`python tools/make_pseudo_labels.py ...`: alias of `maven labels ...` (see `maven labels --help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from maven_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["labels", *sys.argv[1:]]))
