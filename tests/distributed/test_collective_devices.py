"""Every collective the package issues takes tensors on the engine's device (issue 23, finding 1).

NCCL serves CUDA tensors only: a ``torch.tensor([x])`` handed to ``all_reduce`` crashes the first GPU run
("No backend type associated with device type cpu"). On this CPU machine such a tensor is indistinguishable
by its device, so the recorder (tests/helpers/collective_devices.py) tracks where each tensor's device came
from: a factory call without ``device=`` (or ``.cpu()``), and anything computed from it, is on the CPU by
default and counts as a violation. One real stage per backend runs through ``maven train`` on 2 gloo ranks:
training steps, validation, the preemption check, a checkpoint and the export.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.torchrun import torchrun

STAGES = {
    # ZeRO-3: the micro-batch loop (non-finite check, loss mean), validation, the trainer's preemption check.
    "zero3": ("tests/recipes/tiny/stage4.yaml", "conversations", []),
    # 3D, pp=2, stage 3: only the projector trains, on pipeline stage 0, so stage 1 has nothing to train (the
    # group-count probe and the grid-clipped optimizer's empty-rank path); the h_eos pass's p2p and broadcast.
    "3d": ("tests/recipes/tiny/stage3.yaml", "captions", ["parallel.backend=3d", "parallel.pp=2"]),
}
EXPECTED_SITES = {
    "zero3": {"maven_dist/parallel/engine.py", "maven_dist/parallel/distributed.py"},
    "3d": {
        "maven_dist/parallel/three_d.py",
        "maven_dist/parallel/pipe_layers.py",
        "maven_dist/parallel/engine.py",
    },
}


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["zero3", "3d"])
def test_every_collective_of_a_stage_takes_tensors_on_the_engine_device(tiny_assets, tmp_path, backend):
    recipe, data, extra = STAGES[backend]
    run_dir = tmp_path / "run"
    overrides = tiny_assets.overrides(run_dir, data) + [
        "stage.max_steps=2",
        "stage.eval_every=1",
        "checkpoint.every_steps=2",
        "stage.init_missing=base",
        "tracking.enabled=false",
        *extra,
    ]
    torchrun(
        2,
        [
            "tests/distributed/collective_devices_worker.py",
            str(tmp_path),
            recipe,
            *(f"--set={o}" for o in overrides),
        ],
    )
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["code"] == 0
        sites = {call["caller"].split(":")[0] for call in record["calls"]}
        assert EXPECTED_SITES[backend] <= sites, sites
        bad = [
            f"{c['name']} at {c['caller']}: {list(zip(c['devices'], c['defaulted'], strict=True))}"
            for c in record["violations"]
        ]
        assert not bad, f"rank {rank}, engine device {record['device']}: collectives off it:\n" + "\n".join(
            bad
        )
