"""What the layers agree on, importing nothing else from the package: the batch format (``batch``), the
unified vocabulary (``vocab``), the sequence arithmetic (``lengths``), the checkpoint layout
(``checkpoint_layout``) and the preemption protocol between launchers and the trainer (``preemption``)."""
