"""Progress bars that read well both in a terminal and in a log file.

In a terminal, tqdm redraws its bars in place. Written to a file (a cluster job's log), the same redraws become
carriage-return frames ten times a second, all on one line with the lines printed between them, and a nested bar's
cursor moves become `ESC[A` codes. So when stderr is not a terminal, a bar's own updates redraw it at most every
`LOG_FILE_INTERVAL` seconds (a `set_postfix`, as at a log step, still redraws it), each redraw is a line of its own,
and a nested bar draws no second line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TextIO

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
        options.setdefault("file", FramePerLine(sys.stderr))
    return tqdm(iterable, **options)


class FramePerLine:
    """A log file as tqdm's output: each frame of a bar (`\r` + text + padding) becomes a line of its own, and the
    blank frames that clear a bar are dropped, so `grep` and `tail` read the log line by line."""

    def __init__(self, file: TextIO):
        self.file = file

    def write(self, text: str) -> None:
        if frame := text.replace("\r", "").strip():
            self.file.write(frame + "\n")

    def __getattr__(self, name: str):  # flush, encoding (tqdm draws unicode bars where it may), ...
        return getattr(self.file, name)


def write_line(text: str, file: TextIO | None = None) -> None:
    """One line of ours (stdout unless `file` says otherwise), above the progress bar: a plain print would continue
    the bar's line, which has no newline. Rank 0's `tqdm.write` clears its own bar and redraws it below. The other
    processes of its node share its terminal but not its bar: they go back to the start of the line and clear it,
    and rank 0 redraws the bar below at its next update."""
    file = sys.stdout if file is None else file
    shared_terminal = not is_main_process() and getattr(file, "isatty", lambda: False)()
    tqdm.write(("\r\x1b[K" if shared_terminal else "") + text, file=file)
    file.flush()


def is_main_process() -> bool:
    """Rank 0 of a launched job (or a plain single process), from the launcher's environment."""
    return int(os.environ.get("RANK", "0")) == 0
