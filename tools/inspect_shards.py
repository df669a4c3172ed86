"""Verify shards against their ``_info.json`` and summarise them: ``python tools/inspect_shards.py OUT``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout without installing
from mae_tnt.data.inspect import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
