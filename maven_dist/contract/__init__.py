"""What the layers agree on, importing nothing else from the package: the batch format (``batch``), the
unified vocabulary (``vocab``), the sequence arithmetic (``lengths``), the checkpoint layout
(``checkpoint_layout``), the preemption protocol between launchers and the trainer (``preemption``) and
the exit codes and ``--help`` layout every command shares (``command_line``)."""
