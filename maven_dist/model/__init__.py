"""The MaVEn model: unified vocabulary, continuous encoder, patch selector, projector, assembly."""

from maven_dist.model.maven import MavenModel, ModelOutput
from maven_dist.model.spec import MavenSpec

__all__ = ["MavenModel", "MavenSpec", "ModelOutput"]
