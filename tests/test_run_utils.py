"""The launch helper of the multi-process tests: a hung launch fails with every process's stack and leaves none."""

import os
import sys
import textwrap
from pathlib import Path

import pytest
from run_utils import run_launch, stops_running

# A launcher, a rank and its loader worker, the rank in a session of its own as torch's launcher starts it, waiting
# forever as a rank waits on a collective that never comes. They are files, so that the failure names their functions
# only in their stacks (a `-c` script would show its source in the command).
LAUNCHER = textwrap.dedent("""
    import subprocess, sys
    rank = subprocess.Popen([sys.executable, "rank.py"], start_new_session=True)
    rank.wait()
""")
RANK = textwrap.dedent("""
    import os, subprocess, sys, time
    def waits_on_its_peer():
        time.sleep(600)
    worker = subprocess.Popen([sys.executable, "worker.py"], stdout=subprocess.PIPE)
    worker.stdout.readline()
    with open("pids.tmp", "w") as pids:
        pids.write(f"{os.getpid()} {worker.pid}")
    os.replace("pids.tmp", "pids")
    waits_on_its_peer()
""")
WORKER = textwrap.dedent("""
    import time
    def loads_a_batch():
        time.sleep(600)
    print("started", flush=True)
    loads_a_batch()
""")
TIMEOUT = 10
"""Seconds to the abort: time for three interpreters to start on a machine the rest of the suite keeps busy."""


def test_a_hung_launch_fails_with_each_process_stack_and_leaves_no_process(tmp_path):
    for name, script in [("launcher.py", LAUNCHER), ("rank.py", RANK), ("worker.py", WORKER)]:
        (tmp_path / name).write_text(script)
    with pytest.raises(pytest.fail.Exception) as failure:
        run_launch([sys.executable, "launcher.py"], env=dict(os.environ), cwd=tmp_path, timeout=TIMEOUT)
    message = str(failure.value)
    assert f"still ran after {TIMEOUT} s, so it was aborted" in message
    assert "in waits_on_its_peer" in message and "in loads_a_batch" in message  # faulthandler's frame lines
    for pid in map(int, (tmp_path / "pids").read_text().split()):
        assert stops_running(pid, within=10)


def test_a_launch_that_ends_gives_its_return_code_and_output_and_leaves_no_temporary_file(tmp_path):
    script = "import sys, tempfile; print(tempfile.mkdtemp(prefix='torchelastic_')); sys.exit(3)"
    done = run_launch([sys.executable, "-c", script], env=dict(os.environ), cwd=tmp_path, timeout=60)
    assert done.returncode == 3
    made = Path(done.stdout.strip())
    assert made.name.startswith("torchelastic_") and not made.exists() and not made.parent.exists()
