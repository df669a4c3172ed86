"""Two real processes over gloo (`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_worker import JOB_SEPARATOR, KNN_ARGS
from run_utils import built_once, free_port, logged_losses, overridden, run_launch
from shard_utils import write_shards

from mae_tnt.config import DataConfig
from mae_tnt.models import create_model
from mae_tnt.train.knn import knn_accuracy_on_shards

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
BUNDLED = ROOT / "data" / "fashion_mnist"


# No GPU in sight: on a one-GPU machine, accelerate's barrier would still name each rank's GPU (and rank 1 has none)
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT)}


def launch_command(*args) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(WORKER), *map(str, args)]


def launch(*args, timeout=240) -> str:
    """Run dist_worker.py on two ranks; returns their stderr."""
    result = run_launch(launch_command(*args), env=ENV, cwd=ROOT, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stderr


def ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def chained(*jobs: list) -> list:
    """The worker's arguments for running `jobs` one after the other in the same two ranks."""
    return [arg for job in jobs for arg in (JOB_SEPARATOR, *job)][1:]


@pytest.fixture(scope="module")
def reads(tmp_path_factory):
    """One launch for the tests that only read what each rank saw: an epoch of 8 even shards, one of uneven shards,
    and a kNN evaluation and a linear probe of the bundled sample."""
    def build(root: Path) -> None:
        write_shards(root / "even", [8] * 8)
        write_shards(root / "uneven", [10, 10, 10, 10, 3])
        bundled = [["knn", root / "knn", BUNDLED], ["probe", root / "probe", BUNDLED, *PROBE_ARGS]]
        launch(*chained(["stream", root / "even_out", root / "even"],
                        ["stream", root / "uneven_out", root / "uneven"], ["claim", root / "claim"],
                        *(bundled if BUNDLED.exists() else [])))

    return built_once(tmp_path_factory, "dist_reads", build)


def test_two_ranks_see_disjoint_samples_covering_the_epoch(reads):
    first, second = ranks(reads / "even_out")
    assert first["world"] == second["world"] == 2
    assert not set(first["keys"]) & set(second["keys"])
    assert set(first["keys"]) | set(second["keys"]) == {f"s{i:06d}" for i in range(64)}


def test_uneven_shards_give_equal_steps_without_hanging(reads):
    first, second = ranks(reads / "uneven_out")
    assert first["batches"] == second["batches"] == 4


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_knn_splits_the_encoding_across_ranks_and_matches_one_process(reads):
    first, second = ranks(reads / "knn")
    torch.manual_seed(0)  # the workers' encoder
    encoder = create_model("vit_test_patch8_32", num_classes=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers, so the features agree to the last bit
    try:
        alone = knn_accuracy_on_shards(encoder, DataConfig(train=str(BUNDLED), val=str(BUNDLED)), **KNN_ARGS)
    finally:
        torch.set_num_threads(threads)
    # Bank: 4 batches of 64, 2 per rank; queries: 8 batches (the last one padded), 4 per rank.
    assert (alone["knn_train"], alone["knn_val"]) == (256, 500)
    assert first["encoded"] == second["encoded"] == 6 * 64
    assert {key: first[key] for key in alone} == {key: second[key] for key in alone} == pytest.approx(alone)


# 2000 images in batches of 32 on two ranks: 31.25 micro-batches a rank, so with accumulation 2 the first epoch ends
# a micro-batch into step 16, where the ranks' BatchNorm statistics have drifted apart since step 15's.
PROBE_ARGS = ["data.batch_size=32", "data.num_workers=0", "optim.accum_steps=2", "optim.ema_decay=0.9",
              "run.max_steps=17", "run.log_every=100"]


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_ranks_evaluate_and_average_rank_0s_batchnorm_statistics(reads):
    first, second = ranks(reads / "probe")
    # The model and its EMA at the epoch end (step 15 + one micro-batch) and at the stop step.
    assert [step for step, _ in first["evaluations"]] == [15, 15, 17, 17]
    assert first["evaluations"] == second["evaluations"]
    assert first["ema"] == second["ema"]


def test_a_run_directory_that_a_rank_cannot_see_is_refused_on_every_rank(reads):
    """Each rank resolves the relative run.output_dir in a working directory of its own, as on two nodes that do
    not share it: rank 1 would write its checkpoint parts where rank 0 never reads them."""
    for seen in ranks(reads / "claim"):
        assert re.fullmatch(r"run.output_dir=run is not the same directory for every process: rank 1 on \S+ cannot "
                            r"see the run that rank 0 claimed there \(pid \d+ on \S+\); .*every node mounts, at an "
                            r"absolute path", seen["refusal"] or ""), seen
        assert seen["left"] == []  # the folder rank 0 created for the run is removed again


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_shards")
    write_shards(root, [32] * 8, size=20)
    return root


def train_args(shards, out, max_steps):
    return ["train", out / "ranks", f"data.train={shards}", "data.val=null", f"run.output_dir={out}",
            "data.batch_size=8", "data.num_workers=1", "schedule.epochs=2", "schedule.warmup_epochs=0.5",
            "run.log_every=1", "run.checkpoint_every=3", f"run.max_steps={max_steps}", "data.shuffle_chunk=16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three short runs in one launch: 8 steps, the same cut at 5 (for the test to resume) and 3 steps on shards
    with corrupt samples. The ranks' stderr goes to stderr.txt."""
    def build(root: Path) -> None:
        write_shards(root / "shards", [32] * 8, size=20)  # here, not `shards`: the resuming test's worker reads them
        corrupt = frozenset(range(0, 256, 5))  # every fifth sample, so that every rank meets some at once
        write_shards(root / "corrupt", [32] * 8, size=20, corrupt=corrupt)
        stderr = launch(*chained(train_args(root / "shards", root / "full", 8),
                                 train_args(root / "shards", root / "cut", 5),
                                 train_args(root / "corrupt", root / "skips", 3)), timeout=480)
        (root / "stderr.txt").write_text(stderr)

    return built_once(tmp_path_factory, "dist_runs", build)


@pytest.mark.timeout(600)  # two launches, the first of three runs: 100 s on a throttled 2-core machine
def test_two_ranks_keep_identical_parameters_and_resume_exactly(runs):
    first, second = ranks(runs / "full" / "ranks")
    assert first["world"] == 2 and first["steps"] == second["steps"] == 8
    assert first["params"] == second["params"]

    launch(*train_args(runs / "shards", runs / "cut", 8))  # resumes at step 5 (checkpoints every 3 and at the end)
    assert logged_losses(runs / "cut") == logged_losses(runs / "full")
    assert ranks(runs / "cut" / "ranks")[0]["params"] == first["params"]


@pytest.mark.timeout(600)
def test_the_logged_skip_count_sums_every_ranks_skips(runs):
    stderr = (runs / "stderr.txt").read_text()
    first, second = ranks(runs / "skips" / "ranks")
    assert first["skipped"] > 0 and second["skipped"] > 0
    rows = [json.loads(line) for line in (runs / "skips" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_samples"] == first["skipped"] + second["skipped"]
    for rank, skipped in enumerate((first["skipped"], second["skipped"])):  # each rank names the samples it lost
        named = re.findall(rf"warning \(rank {rank} of 2\): skipped sample \S+\.tar:s\d{{6}} "
                           r"\(made from img/\d+\.png\): ", stderr)
        assert len(named) == skipped, stderr[-3000:]


def test_sigterm_to_both_ranks_saves_within_the_check_interval_not_the_log_interval(shards, tmp_path):
    out = tmp_path / "run"
    # 5000 steps outlast the signal on any machine (a 16-core GPU host ran 60 of them within its first second), so
    # only an agreed check step can stop the run, never its end; log and checkpoint steps lie beyond the signal too.
    args = overridden(train_args(shards, out, 5000), ["data.batch_size=2", "schedule.epochs=100", "run.log_every=6000",
                                                      "run.checkpoint_every=6000", "run.preempt_check_every=2"])
    env = {**ENV, "TMPDIR": str(tmp_path)}  # for torch's launcher's log directory, which it leaves behind
    process = subprocess.Popen(launch_command(*args), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 180
    while not list(out.glob("tensorboard/*")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # the run has started its loop once its first log files exist
    time.sleep(1.0)
    os.killpg(process.pid, signal.SIGTERM)  # as SLURM signals a job: launcher and both ranks
    output = process.communicate(timeout=120)[0]
    assert "SIGTERM received" in output, output[-3000:]
    saved = [path for path in (out / "checkpoints").glob("step_*")]
    assert len(saved) == 1, output[-3000:]
    step = int(saved[0].name.split("_")[1])
    assert step < 5000 and step % 2 == 0  # at a check step, long before the end
    assert {path.name for path in saved[0].glob("data_rank*.json")} == {"data_rank0.json", "data_rank1.json"}
