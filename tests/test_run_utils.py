"""The launch helper of the multi-process tests: a hung launch fails with every process's stack and leaves none."""

import os
import sys
import textwrap
from pathlib import Path

import pytest
from run_utils import run_launch

# A launcher whose child waits forever in a named function, as a rank waits on a collective that never comes (8 s
# leave a loaded machine time to start both).
HANGING_LAUNCHER = textwrap.dedent("""
    import subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time\\ndef waits_on_its_peer(): time.sleep(600)\\n"
                              "print('started', flush=True)\\nwaits_on_its_peer()"], stdout=subprocess.PIPE)
    child.stdout.readline()
    open("child.pid", "w").write(str(child.pid))
    child.wait()
""")


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie, which only waits for its parent to collect it, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_hung_launch_fails_with_each_process_stack_and_leaves_no_process(tmp_path):
    with pytest.raises(pytest.fail.Exception) as failure:
        run_launch([sys.executable, "-c", HANGING_LAUNCHER], env=dict(os.environ), cwd=tmp_path, timeout=8)
    message = str(failure.value)
    assert "still ran after 8 s, so it was aborted" in message
    assert "in waits_on_its_peer" in message and "child.wait()" in message  # the child's stack, the launcher's
    assert not running(int((tmp_path / "child.pid").read_text()))


def test_a_launch_that_ends_gives_its_return_code_and_output(tmp_path):
    done = run_launch([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], env=dict(os.environ),
                      cwd=Path(tmp_path), timeout=60)
    assert (done.returncode, done.stdout) == (3, "out\n")
