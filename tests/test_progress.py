"""Progress bars in a terminal and in a log file."""

from __future__ import annotations

import sys

from mae_tnt.progress import LOG_FILE_INTERVAL, progress_bar


def test_bars_written_to_a_log_file_redraw_rarely_and_nest_without_cursor_moves(capsys):
    with progress_bar(total=2, desc="outer") as outer:
        assert outer.mininterval == LOG_FILE_INTERVAL  # capsys's stderr is no terminal, like a job's log file
        for _ in range(2):
            outer.update(1)
            assert sum(1 for _ in progress_bar(range(3), nested=True, desc="inner")) == 3
    err = capsys.readouterr().err
    assert "\x1b[A" not in err and "inner" in err and "outer: 100%" in err


def test_bars_in_a_terminal_keep_tqdms_live_redraws(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with progress_bar(total=2) as outer, progress_bar(total=2, nested=True) as inner:
        assert outer.mininterval < 1 and outer.leave and not inner.leave
