"""Merge sharded training checkpoints into one HF-layout MaVEn model (``maven merge``, also ``python tools/merge_ckpt.py``).

Pieces, one job each: ``source`` finds the checkpoint and defines what a reader answers;
``torch_files`` locates tensors inside ``torch.save`` files without loading them; ``local_source``,
``zero3_source`` and ``three_d_source`` read the three engine layouts; ``output_files`` checks the parameters against the skeleton's
model and lays out the output files; ``writer`` streams them; ``merge`` orchestrates, verifies and
writes the provenance.
"""

from maven_dist.merge.errors import MergeError
from maven_dist.merge.merge import PROVENANCE_FILE, MergeOptions, MergeResult, merge_checkpoint

__all__ = ["PROVENANCE_FILE", "MergeError", "MergeOptions", "MergeResult", "merge_checkpoint"]
