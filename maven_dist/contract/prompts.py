"""LLaVA-1.5's answer-format instructions, which training data and the benchmarks' prompts share.

LLaVA-665K asks its short-answer questions (VQAv2, GQA, OCR-VQA, ...) with the same instruction that
LLaVA-1.5's evaluation scripts append to VQAv2/GQA/TextVQA/MME questions, and its multiple-choice data
with the letter instruction of ``model_vqa_mmbench.py``: a model learns the answer format from the first
and is scored with the second. The demo's synthetic training conversations (``offline/synthetic_qa.py``)
and the benchmark readers (``eval/tasks/``) both read them from here.
"""

SHORT_ANSWER = "Answer the question using a single word or phrase."
"""LLaVA-1.5's short-answer instruction (``llava/eval/model_vqa_loader.py`` prompts, LLaVA-665K)."""
CHOICE_LETTER = "Answer with the option's letter from the given choices directly."
"""LLaVA-1.5's multiple-choice instruction (``llava/eval/model_vqa_mmbench.py``)."""
