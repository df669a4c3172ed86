"""Export a checkpoint's encoder or classifier for timm and mae_tnt (see mae_tnt/export.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_tnt.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
