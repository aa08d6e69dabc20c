"""Benchmark scoring rules as pure functions (standard library only; no model, no torch).

Modules:

- ``vqa``: VQA v2 / TextVQA answer normalisation and the leave-one-out VQA accuracy, GQA exact
  match, and the per-benchmark percentage.
- ``mme``: MME yes/no parsing, per-subtask accuracy and accuracy+, perception and cognition totals.
- ``multiple_choice``: MMBench circular evaluation, answer-letter extraction from generated text,
  likelihood-based option choice, accuracy.
- ``rouge``: ROUGE-L (textbook and DEMONBench's exact variant), DEMONBench's text normalisation,
  exact match and TF-IDF nearest choice for cloze / multiple-choice tasks.

Per-question scores are in [0, 1]; aggregated benchmark accuracies are percentages in [0, 100];
MME subtask scores are in [0, 200].
"""
