"""Evaluation of trained MaVEn models: benchmark readers, scoring, runners."""
