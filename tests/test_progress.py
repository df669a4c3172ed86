"""Progress bars in a terminal and in a log file."""

from __future__ import annotations

import io
import sys

from mae_tnt.progress import LOG_FILE_INTERVAL, progress_bar, write_line


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


def test_in_a_log_file_each_redraw_is_a_line_of_its_own_and_our_lines_stay_whole(monkeypatch):
    log = io.StringIO()  # stdout and stderr to one file, as `> job.log 2>&1` does
    monkeypatch.setattr(sys, "stdout", log)
    monkeypatch.setattr(sys, "stderr", log)
    with progress_bar(total=2, desc="train") as bar:
        bar.update(1)
        bar.set_postfix(loss=1.0)
        write_line("epoch 1: val top-1 50.00")
        assert sum(1 for _ in progress_bar(range(2), nested=True, desc="validation")) == 2
        bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and "epoch 1: val top-1 50.00" in lines
    assert all(line.startswith(("train: ", "validation: ", "epoch 1")) for line in lines), lines
    assert lines[-1].startswith("train: 100%")
