"""The MaVEn model: unified vocabulary, continuous encoder, patch selector, projector, assembly."""

from maven_dist.model.maven import MavenModel, MavenSpec, ModelOutput
from maven_dist.model.vocab import VocabLayout, extend_tokenizer

__all__ = ["MavenModel", "MavenSpec", "ModelOutput", "VocabLayout", "extend_tokenizer"]
