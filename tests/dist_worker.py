"""Run under `accelerate launch` by tests/test_distributed.py: writes what each rank saw to OUT/rank{r}.json.

    dist_worker.py MODE OUT [ARGS...] [+ MODE OUT [ARGS...]]...
"""

import hashlib
import json
import os
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
    params = digest(trainer.acc.unwrap_model(trainer.model).state_dict().values())
    write(out, trainer.acc.process_index, {"steps": summary["steps"], "params": params,
                                            "world": trainer.acc.num_processes,
                                            "skipped": trainer.stream.state.skipped})


def probe(out: Path, shard_dir: str, overrides: list[str]) -> None:
    """A short linear probe with an EMA; records, for every evaluation, the step and a hash of the buffers (the
    probe's BatchNorm statistics) of the model this rank scored its share with."""
    from mae_tnt.config import load_config
    from mae_tnt.finetune_config import FinetuneConfig
    from mae_tnt.train.finetune import FinetuneRun

    root = Path(__file__).resolve().parents[1]
    data = [f"data.train={shard_dir}", f"data.val={shard_dir}", f"run.output_dir={out}"]
    run = FinetuneRun(load_config(FinetuneConfig, root / "recipes/demo_linprobe_vit.yaml", data + overrides))
    evaluations, evaluate = [], run.evaluate

    def recorded(model):
        evaluations.append([run.step, digest(model.buffers())])
        return evaluate(model)

    run.evaluate = recorded
    run.train()
    write(out, run.rank, {"evaluations": evaluations, "ema": digest(run.ema.module.state_dict().values())})


def claim(out: Path) -> None:
    """Claim the relative run directory `run` from a working directory of each rank's own, as nodes without shared
    storage would see it; records the refusal and what is left in each working directory."""
    from mae_tnt.config import ConfigError
    from mae_tnt.train.run_lock import claim_run_directory

    state = Accelerator()
    home = out / f"node{state.process_index}"
    home.mkdir(parents=True, exist_ok=True)
    started_in = os.getcwd()
    os.chdir(home)
    try:
        claim_run_directory(Path("run"), state)
        refusal = None
    except ConfigError as err:
        refusal = str(err)
    finally:
        os.chdir(started_in)
    write(out, state.process_index, {"refusal": refusal, "left": [path.name for path in home.iterdir()]})


def digest(tensors) -> str:
    hashed = hashlib.sha256()
    for tensor in tensors:
        hashed.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hashed.hexdigest()


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
        elif mode == "claim":
            claim(Path(out))
        elif mode == "probe":
            probe(Path(out), rest[0], rest[1:])
        else:
            train(Path(out), rest)
