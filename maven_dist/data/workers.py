"""Helper processes (DataLoader workers, preparation pools) start from a clean process, never as a fork of a
process that runs threads.

A fork copies one thread; the child then runs ``PyOS_AfterFork_Child``, which takes CPython's runtime head
lock. If another thread held that lock at the moment of the fork (any thread that creates or ends a thread
state: a C++ thread entering Python through ``PyGILState_Ensure``, as torch's, pybind11's and MLflow's
helpers do), the child waits for it forever: CPython gh-112275, fixed in 3.12 and 3.11.8 (this project
runs on 3.11.7 too). A rank 0 that forks DataLoader workers at every validation pass and epoch hangs
sooner or later; the hung worker ignores SIGTERM, and the other ranks wait in their next collective.

``forkserver`` avoids it: the first worker start launches one server process with
``_posixsubprocess.fork_exec`` (fork immediately followed by exec, no Python code in between: safe under
threads), the server imports :data:`PRELOAD` once, and every worker is forked from that single-threaded
server. Chosen over ``spawn`` (each worker re-imports torch, transformers and the package: seconds per worker
per pass) and over persistent workers started before any thread (validation, epochs and the preparation
pool would each need their own long-lived pool, and "before any thread" is not something a library can
promise: DeepSpeed, MLflow and tqdm start threads of their own). Measured in docs/performance.md
("DataLoader workers").
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterable
from multiprocessing.context import BaseContext

START_METHOD = "forkserver"
PRELOAD = ["maven_dist.data.loader", "maven_dist.data.tokenizer"]
"""Modules the fork server imports once (torch, numpy, pyarrow, PIL, the sample formats, transformers'
tokenizers): a worker forked from it only unpickles its dataset (a pass starts in 0.2-0.4 s here, as with
``fork``; without the tokenizers preloaded every worker imported them again: 3 s per pass)."""


def worker_context(preload: Iterable[str] = ()) -> BaseContext:
    """The multiprocessing context every helper process of the package starts in (see the module doc).

    `preload`: modules the workers will need beyond :data:`PRELOAD`, e.g. the module of a tokenizer they
    unpickle (transformers' tokenizer modules take seconds to import: per worker, per pass, unless the server
    has them). The server reads the list when it starts, at the first worker start of the process."""
    context = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        context.set_forkserver_preload(list(dict.fromkeys([*PRELOAD, *preload])))
    return context
