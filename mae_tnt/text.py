"""Wording shared by the package's messages."""

from __future__ import annotations


def counted(count: int, noun: str) -> str:
    """'1 shard' or '3 shards', '1 class' or '2 classes': counts of one are common in messages."""
    return f"{count} {noun if count == 1 else noun + ('es' if noun.endswith('s') else 's')}"
