"""Stage-1 patch pseudo labels: which patches the text talks about.

``patch_labels`` (mask -> patch grid), ``sources``/``coco``/``visual_genome``/``grounding_sam`` (where
masks come from), ``make_labels`` (``make_patch_labels``, a column job of ``maven_dist.offline.shard_jobs``).
See docs/data_preparation.md.
"""
