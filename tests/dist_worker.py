"""Run under `accelerate launch` by tests/test_distributed.py: writes what each rank saw to OUT/rank{r}.json.

    dist_worker.py MODE OUT [ARGS...] [+ MODE OUT [ARGS...]]...
"""

import hashlib
import json
import sys
from functools import partial
from itertools import groupby
from pathlib import Path

import torch
from accelerate import Accelerator

from mae_tnt.data.loader import make_loader
from mae_tnt.data.shards import resolve_shards
from mae_tnt.data.stream import ShardStream
from mae_tnt.data.transforms import train_crop

JOB_SEPARATOR = "+"
KNN_ARGS = {"img_size": 32, "batch_size": 64, "k": 20, "max_train": 256}
"""The `knn` mode's evaluation, which tests/test_distributed.py repeats in one process."""


def stream_epoch(shard_dir: str, out: Path) -> None:
    """One epoch of the rank's stream with 2 workers: keys and batch count."""
    state = Accelerator()  # honours ACCELERATE_USE_CPU, unlike a bare PartialState
    transform = partial(train_crop, size=16, scale=(0.2, 1))
    stream = ShardStream(resolve_shards(shard_dir), batch_size=4, transform=transform, seed=0,
                         rank=state.process_index, world_size=state.num_processes, num_workers=2, chunk=4)
    keys, batches = [], 0
    for batch in make_loader(stream):
        keys += batch["keys"]
        batches += 1
    write(out, state.process_index, {"keys": keys, "batches": batches, "world": state.num_processes})


def train(out: Path, overrides: list[str]) -> None:
    """A short pretraining run, its warnings shown as pretrain.py shows them; records a hash of the final parameters
    of this rank and the samples it skipped."""
    from mae_tnt.cli import report_user_errors
    from mae_tnt.config import PretrainConfig, load_config
    from mae_tnt.train.engine import Trainer

    root = Path(__file__).resolve().parents[1]
    trainer = Trainer(load_config(PretrainConfig, root / "recipes/demo_mae_vit.yaml", overrides))
    summary = report_user_errors(trainer.train)
    digest = hashlib.sha256()
    for value in trainer.acc.unwrap_model(trainer.model).state_dict().values():
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    write(out, trainer.acc.process_index, {"steps": summary["steps"], "params": digest.hexdigest(),
                                            "world": trainer.acc.num_processes,
                                            "skipped": trainer.stream.state.skipped})


def knn(out: Path, shard_dir: str) -> None:
    """kNN accuracy of a fixed random encoder, each rank encoding its share; records the images this rank encoded."""
    from mae_tnt.config import DataConfig
    from mae_tnt.models import create_model
    from mae_tnt.train.knn import knn_accuracy_on_shards

    state = Accelerator()
    torch.manual_seed(0)  # the same encoder on every rank and in the test's single-process reference
    encoder = create_model("vit_test_patch8_32", num_classes=0)
    encoded = []
    encoder.patch_embed.register_forward_hook(lambda module, args, output: encoded.append(args[0].shape[0]))
    result = knn_accuracy_on_shards(encoder, DataConfig(train=shard_dir, val=shard_dir), **KNN_ARGS,
                                    device=state.device, rank=state.process_index, world_size=state.num_processes,
                                    gather=state.gather)
    write(out, state.process_index, {**result, "encoded": sum(encoded)})


def write(out: Path, rank: int, payload: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(payload))


def jobs(args: list[str]) -> list[list[str]]:
    """`MODE OUT [ARGS...]` jobs separated by `+`: one launch runs several, since starting the ranks costs more than
    most jobs."""
    return [list(job) for is_separator, job in groupby(args, lambda arg: arg == JOB_SEPARATOR) if not is_separator]


if __name__ == "__main__":
    torch.set_num_threads(1)
    for mode, out, *rest in jobs(sys.argv[1:]):
        if mode == "stream":
            stream_epoch(rest[0], Path(out))
        elif mode == "knn":
            knn(Path(out), rest[0])
        else:
            train(Path(out), rest)
