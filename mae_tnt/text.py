"""Wording shared by the package's messages."""

from __future__ import annotations

import argparse
import difflib
import errno
import reprlib


def counted(count: int, noun: str) -> str:
    """'1 shard' or '3 shards', '1 class' or '2 classes': counts of one are common in messages."""
    return f"{count} {noun if count == 1 else noun + ('es' if noun.endswith('s') else 's')}"


def disk_full_message(err: OSError, retry: str) -> str | None:
    """The error line's text for a write that failed for want of disk space or quota, saying what to do and what
    running the command again does (`retry`); None for any other error."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return f"{err}; free some disk space and run the same command again: {retry}"


_SHORT = reprlib.Repr()  # keyword arguments only from Python 3.12 on
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 6, 6, 80, 80


def shown(value: object) -> str:
    """`repr(value)` cut short: a recipe's YAML aliases can nest a few lines into billions of values, which a full
    repr in an error message would spell out until memory runs out."""
    return _SHORT.repr(value)


def positive_int(text: str) -> int:
    """An argparse type: an int of at least 1, refused with a usage error naming the option otherwise."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class HelpWithDefaults(argparse.HelpFormatter):
    """The tools' --help: each option's help ends with its default, where it has one to show (not None, a flag's
    False or an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == [] or default is argparse.SUPPRESS
        if action.option_strings and not unset and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def close_names(name: str, names) -> list[str]:
    """Up to three of `names` that look like `name` (a typo's likely intent): those it begins (`tnt_s` for
    `tnt_s_patch16_224`) first, then the closest; capitals do not count."""
    wanted, names = name.lower(), sorted(names)
    beginning = [known for known in names if known.startswith(wanted)]
    return list(dict.fromkeys(beginning + difflib.get_close_matches(wanted, names, n=3, cutoff=0.5)))[:3]
