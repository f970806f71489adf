"""The progress callback every long use case accepts, and the outcome shape of those that
can fail after doing useful work.

Progress is ``(kind, text)``: ``warn`` (something the user should know), ``info`` (a
step done), ``created`` (a run record exists), and the builder's own kinds (``start``,
``step``, ``wait``, ``note``, ``done``). The caller decides how to show each; the
application layer never prints.
"""

from __future__ import annotations

from typing import Callable

Progress = Callable[[str, str], None]


def silent(kind: str, text: str) -> None:
    """The default progress: drop everything (a server passes its own)."""
