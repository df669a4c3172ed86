"""Progress bars that read well both in a terminal and in a log file.

In a terminal, tqdm redraws its bars in place. Written to a file (a cluster job's log), the same redraws become
carriage-return frames ten times a second, and a nested bar's cursor moves become `ESC[A` codes. So when stderr is
not a terminal, a bar's own updates redraw it at most every `LOG_FILE_INTERVAL` seconds (a `set_postfix`, as at a
log step, still redraws it) and a nested bar shares the first line.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm

LOG_FILE_INTERVAL = 30.0
"""Seconds between redraws of a bar written to a file rather than a terminal."""


def progress_bar(iterable: Iterable | None = None, *, nested: bool = False, **options) -> tqdm:
    """A tqdm bar over `iterable` with tqdm's `options`; `nested` marks a bar drawn while another is open, which
    clears itself when done."""
    options.setdefault("dynamic_ncols", True)
    options.setdefault("leave", not nested)
    if not sys.stderr.isatty():
        options.setdefault("mininterval", LOG_FILE_INTERVAL)
        if nested:
            options["position"] = 0  # a second line is reached by moving the cursor, which a file cannot do
    return tqdm(iterable, **options)
