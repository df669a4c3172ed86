"""Real signals against a real run: SIGKILL at a random step resumes exactly; SIGTERM saves before exiting."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_utils import logged_losses
from shard_utils import write_shards

ROOT = Path(__file__).resolve().parents[1]
# Bitwise equality needs the same thread count in every run: it decides the order of float reductions.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt_shards")
    write_shards(root, [32] * 4, size=20)
    return root


def command(shards, out, max_steps, workers=1, epochs=2):
    return [sys.executable, str(ROOT / "pretrain.py"), str(ROOT / "recipes/demo_mae_vit.yaml"), f"data.train={shards}",
            "data.val=null", f"run.output_dir={out}", "data.batch_size=8", f"data.num_workers={workers}",
            f"schedule.epochs={epochs}", "schedule.warmup_epochs=0.5", "run.log_every=1", "run.checkpoint_every=2",
            f"run.max_steps={max_steps}", "data.shuffle_chunk=16"]


# run.max_steps of a run that is signalled, with as many epochs (16 steps each) for the schedule: at 20 steps/s, a
# 30-step run could end between two polls of a test process that the machine's load held back, and no signal came.
LONG_RUN = 300


def logged_steps(out: Path) -> int:
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def start_and_signal(shards, out, max_steps, at_step, signum, workers=1, epochs=2) -> subprocess.Popen:
    """Signal the run's whole process group (its loader workers too), as SLURM and Kubernetes do."""
    process = subprocess.Popen(command(shards, out, max_steps, workers, epochs), env=ENV, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 180
    while logged_steps(out) < at_step and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signum)
    process.wait(timeout=120)
    return process


def test_sigkill_at_a_random_step_resumes_exactly(shards, tmp_path):
    subprocess.run(command(shards, tmp_path / "full", 14), check=True, cwd=ROOT, capture_output=True, env=ENV)
    kill_at = random.Random(os.getpid()).randint(3, 11)
    start_and_signal(shards, tmp_path / "cut", 14, kill_at, signal.SIGKILL)
    subprocess.run(command(shards, tmp_path / "cut", 14), check=True, cwd=ROOT, capture_output=True, env=ENV)
    assert logged_losses(tmp_path / "cut") == logged_losses(tmp_path / "full"), f"killed at step {kill_at}"


def test_sigterm_to_the_process_group_saves_a_checkpoint_before_exit(shards, tmp_path):
    process = start_and_signal(shards, tmp_path, LONG_RUN, 3, signal.SIGTERM, workers=2, epochs=LONG_RUN)
    output = process.stdout.read()
    assert process.returncode == 143, output  # not 0: `pretrain && next-step` must not go on with half a run
    assert "SIGTERM received: saving a checkpoint after this step, then exiting" in output
    assert "stopped early by SIGTERM after step" in output
    steps = [int(p.name.split("_")[1]) for p in (tmp_path / "checkpoints").glob("step_*")]
    last = max(steps)
    assert 3 <= last < LONG_RUN  # stopped early, with a checkpoint at the step where it stopped
    assert logged_losses(tmp_path)[-1][0] == last


def test_ctrl_c_exits_with_one_line_saying_how_to_resume(shards, tmp_path):
    process = start_and_signal(shards, tmp_path, LONG_RUN, 2, signal.SIGINT, workers=2, epochs=LONG_RUN)
    output = process.stdout.read()
    assert process.returncode == 130, output
    assert "interrupted; run the same command again to resume" in output and "Traceback" not in output


def test_an_error_in_a_loader_worker_ends_the_run_with_one_line_instead_of_hanging(tmp_path):
    write_shards(tmp_path / "bad", [32] * 2, size=20, corrupt=frozenset(range(64)))
    try:
        result = subprocess.run(command(tmp_path / "bad", tmp_path / "out", 4, workers=2), env=ENV, cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the run hung after its loader worker failed")
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: no readable image in "), errors
    assert "(last error: unknown image format)" in errors[0]  # not PIL's text with the buffer's memory address
    assert "Traceback" not in result.stderr
