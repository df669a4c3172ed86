"""Fine-tuning, linear-probe and kNN entry point.

    accelerate launch finetune.py recipes/finetune_vit_b.yaml init=runs/mae_vit_b/checkpoints/step_00100000
    python finetune.py recipes/demo_finetune_vit.yaml init=runs/demo_mae_vit
    python finetune.py recipes/demo_knn_vit.yaml init=... knn.k=10
"""

import sys

from mae_tnt.finetune_cli import run_finetune

if __name__ == "__main__":
    sys.exit(run_finetune(sys.argv[1:]))
