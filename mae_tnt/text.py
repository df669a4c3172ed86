"""Wording shared by the package's messages."""

from __future__ import annotations

import argparse


def counted(count: int, noun: str) -> str:
    """'1 shard' or '3 shards', '1 class' or '2 classes': counts of one are common in messages."""
    return f"{count} {noun if count == 1 else noun + ('es' if noun.endswith('s') else 's')}"


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
