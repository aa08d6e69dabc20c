"""maven_dist: distributed training of MaVEn, the multi-granularity hybrid visual encoding MLLM.

Importing the package changes nothing in the process: the entry points set up what a maven process needs
(``maven_dist/entry_point.py``), and importing ``maven_dist.model`` registers MaVEn with transformers' Auto
classes, so ``AutoModel.from_pretrained(DIR)`` loads a stage export or a ``maven merge`` output.
"""
