"""Offline per-image shard columns made by frozen models: stage-1 patch labels and discrete codes.

``patch_labels`` (mask -> patch grid), ``sources``/``coco``/``visual_genome``/``grounding_sam``
(where masks come from), ``make_labels`` (``make_patch_labels``), ``shard_jobs`` (the resumable
per-shard column job, ``tokenize_shards``). See docs/data_preparation.md.
"""
