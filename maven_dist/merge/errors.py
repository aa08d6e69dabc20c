"""The one error type of the merge tool: every message names the file and what to do."""

from __future__ import annotations


class MergeError(RuntimeError):
    """A checkpoint cannot be merged as asked (missing, mixed, truncated or corrupt files, bad options)."""
