"""Worker for test_collective_devices.py: one stage through the real trainer (`maven train`), every
collective the package issues recorded with its tensors' devices (tests/helpers/collective_devices.py).

argv: OUT_DIR RECIPE [--set key=value ...]. Each rank writes OUT_DIR/rank{RANK}.json: the trainer's exit
code, the engine's device (DistEnv.device: what every engine runs on) and the recorded calls.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from maven_dist.parallel.distributed import DistEnv  # noqa: E402
from maven_dist.train.__main__ import main as train_main  # noqa: E402
from tests.helpers.collective_devices import CollectiveDeviceRecorder  # noqa: E402


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    with CollectiveDeviceRecorder() as recorder:
        code = train_main(argv)
    device = DistEnv(rank, local_rank, int(os.environ["WORLD_SIZE"])).device
    record = {
        "code": code,
        "device": str(device),
        "calls": [asdict(c) for c in recorder.calls],
        "violations": [asdict(c) for c in recorder.violations(device)],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    sys.exit(code)


if __name__ == "__main__":
    main()
