"""Projector from kept patch features to the LLM width (LLaVA-1.5 ``mlp2x_gelu``)."""

from __future__ import annotations

from torch import nn


def build_projector(kind: str, feature_size: int, llm_size: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(feature_size, llm_size)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(feature_size, llm_size), nn.GELU(), nn.Linear(llm_size, llm_size))
    raise ValueError(f"unknown projector kind {kind!r}; use mlp2x_gelu or linear")
