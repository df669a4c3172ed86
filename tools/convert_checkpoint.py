"""Convert official MAE / TNT / SReT / timm checkpoints into mae_tnt's layout (see mae_tnt/convert_checkpoint.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_tnt.convert_checkpoint import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
