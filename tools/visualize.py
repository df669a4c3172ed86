"""Original / masked / reconstructed grid of a pretraining checkpoint (see mae_tnt/visualize.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_tnt.visualize import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
