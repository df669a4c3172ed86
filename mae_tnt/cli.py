"""Command-line front ends shared by `pretrain.py` and `finetune.py`: recipe + dotted overrides, friendly errors."""

from __future__ import annotations

import sys

from .config import ConfigError, PretrainConfig, load_config

USAGE = "usage: {prog} RECIPE.yaml [key=value ...]   (e.g. optim.base_lr=1e-4 run.output_dir=/tmp/run)"


def parse_args(argv: list[str], prog: str) -> tuple[str, list[str]]:
    if not argv or argv[0] in ("-h", "--help") or "=" in argv[0]:
        print(USAGE.format(prog=prog), file=sys.stderr)
        raise SystemExit(2)
    return argv[0], argv[1:]


def run_pretrain(argv: list[str]) -> int:
    recipe, overrides = parse_args(argv, "pretrain.py")
    try:
        cfg = load_config(PretrainConfig, recipe, overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .train.engine import pretrain  # heavy imports only once the config is valid

    summary = pretrain(cfg)
    print(f"done: {summary['steps']} steps; outputs in {summary['output_dir']}")
    return 0
