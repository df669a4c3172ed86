"""Convert an image dataset into webdataset shards: ``python tools/make_shards.py SRC OUT [options]``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout without installing
from mae_tnt.data.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
