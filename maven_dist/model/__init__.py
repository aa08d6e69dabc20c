"""The MaVEn model: unified vocabulary, continuous encoder, patch selector, projector, assembly.

Importing it registers MaVEn with transformers' Auto classes, as a transformers model package does, so
``AutoConfig`` / ``AutoModel.from_pretrained(DIR)`` load a stage export or a ``maven merge`` output.
"""

from maven_dist.model.generation import MavenForConditionalGeneration, register_auto_classes
from maven_dist.model.maven import MavenModel, ModelOutput
from maven_dist.model.spec import MavenSpec

register_auto_classes()

__all__ = ["MavenForConditionalGeneration", "MavenModel", "MavenSpec", "ModelOutput"]
