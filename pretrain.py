"""MAE pretraining entry point.

    accelerate launch pretrain.py recipes/mae_tnt_s.yaml [key=value ...]
    python pretrain.py recipes/demo_mae_vit.yaml run.output_dir=/tmp/run optim.base_lr=1e-4
"""

import sys

from mae_tnt.cli import run_pretrain

if __name__ == "__main__":
    sys.exit(run_pretrain(sys.argv[1:]))
