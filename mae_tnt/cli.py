"""Command-line front ends shared by `pretrain.py` and `finetune.py`: recipe + dotted overrides, friendly errors."""

from __future__ import annotations

import os
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable
from functools import partial, wraps
from pathlib import Path
from typing import TypeVar

from .config import ConfigError, PretrainConfig, UnknownKeyError, all_keys, load_config
from .ctrl_c import kill_children, raise_if_pending, recorded
from .finetune_config import FinetuneConfig
from .progress import is_main_process, write_line
from .text import counted, disk_full_message

PACKAGE_DIR = Path(__file__).resolve().parent
USAGE = "usage: {prog} RECIPE.yaml [key=value ...]   (e.g. optim.base_lr=1e-4 run.output_dir=/tmp/run)"


def load_recipe(cls: type, argv: list[str], prog: str):
    """The config of `prog RECIPE.yaml [key=value ...]`; usage and config errors exit with status 2, --help with 0."""
    if {"-h", "--help"} & set(argv):
        print(f"{USAGE.format(prog=prog)}\n\n{textwrap.fill(ABOUT[cls], 116)}\n\n{keys_help(cls)}")
        raise SystemExit(0)
    if not argv or "=" in argv[0] and not Path(argv[0]).is_file():  # a run's config.yaml under lr=1e-4/ is a recipe
        missing = "the recipe comes first" if argv else "give a recipe"
        print(f"{USAGE.format(prog=prog)}\nerror: {missing}, e.g. {prog} {EXAMPLE_RECIPE[cls]}"
              f"{' ' + ' '.join(argv) if argv else ''}", file=sys.stderr)
        raise SystemExit(2)
    try:
        return load_config(cls, argv[0], argv[1:])
    except ConfigError as err:
        if is_local_main_process():  # every process of a node reads the same recipe and arguments
            print(f"error: {_other_script_hint(cls, err) or err}", file=sys.stderr)
        raise SystemExit(2) from None


ABOUT = {
    PretrainConfig: "MAE self-supervised pretraining: streams the shards of data.train into the masked autoencoder "
                    "model.name (ViT, TNT or SReT encoder) and writes config.yaml, metrics, reconstruction grids and "
                    "checkpoints to run.output_dir, resuming from its last checkpoint when rerun.",
    FinetuneConfig: "Supervised use of an encoder on labeled shards, starting from init (a pretraining checkpoint, "
                    "run directory or export; null for random weights): mode=finetune trains it all, "
                    "mode=linprobe trains a linear head on frozen features, mode=knn evaluates a weighted kNN "
                    "classifier of the features.",
}
"""What each script does, opening its --help."""

EXAMPLE_RECIPE = {PretrainConfig: "recipes/demo_mae_vit.yaml", FinetuneConfig: "recipes/demo_finetune_vit.yaml"}

OTHER_SCRIPT = {PretrainConfig: (FinetuneConfig, "fine-tuning", "finetune.py"),
                FinetuneConfig: (PretrainConfig, "pretraining", "pretrain.py")}


def _other_script_hint(cls: type, err: ConfigError) -> str | None:
    """A recipe key unknown here but known to the other script most likely means its recipe was given to this one
    (an override of such a key is a slip of the command line, which the plain error answers with the closest key)."""
    other, kind, script = OTHER_SCRIPT[cls]
    if isinstance(err, UnknownKeyError) and err.source != "command line" and err.key in all_keys(other):
        return f"{err.source}: `{err.key}` is a {kind} key; is this a {kind} recipe? Run it with {script}"
    return None


def keys_help(cls: type) -> str:
    """Every config key a recipe or override may set, by section (the recipes in recipes/ show them in use)."""
    keys = all_keys(cls)
    sections: dict[str, list[str]] = {}
    for key in keys:
        section, _, rest = key.partition(".")
        if rest or not any(other.startswith(f"{key}.") for other in keys):  # a section's own name is no key
            sections.setdefault(section if rest else "top level", []).append(rest or key)
    lines = [textwrap.fill(", ".join(names), 110, initial_indent=f"  {section}: ", subsequent_indent="    ")
             for section, names in sections.items()]
    return ("Recipes are in recipes/. Config keys, set in a recipe or as key=value (each documented in "
            "mae_tnt/config.py or mae_tnt/finetune_config.py):\n" + "\n".join(lines))


# What a shell reports for a process that SIGTERM ended: a preempted run says it stopped early, so `a && b` chains
# and job scripts do not take a half-trained model for a finished one.
PREEMPTED_EXIT = 128 + 15
INTERRUPTED_EXIT = 128 + 2  # likewise for Ctrl-C (SIGINT)


Main = Callable[[list[str] | None], int]
Config = TypeVar("Config", PretrainConfig, FinetuneConfig)


def quiet_on_ctrl_c(advice: str = "run the same command again to resume from the last checkpoint (or to start "
                                   "over if none was written yet)") -> Callable[[Main], Main]:
    """A decorator: `main` ends with `interrupted; {advice}` instead of a traceback on Ctrl-C, which may come at any
    time: while torch is imported as well as between steps.

    Python drops a KeyboardInterrupt raised inside a finalizer or weakref callback, printing "Exception ignored in ..."
    with a traceback, while the loader workers, which got the same Ctrl-C, may have stopped: the run then fails a
    moment later on the vanished workers, or goes on. A Ctrl-C is therefore recorded as it arrives, an error that
    follows it is reported as the interrupt, Python's report of the dropped KeyboardInterrupt is left out, and the
    drop is kept in `ctrl_c.PENDING` for the training loop, or the end of `main`, to raise (as is a Ctrl-C inside a
    `ctrl_c.deferred()` block).

    Loader workers ignore the SIGTERM that multiprocessing ends its children with at exit
    (`loader._ignore_stop_signals`), and it would wait for any left running forever, so an interrupted command kills
    the children it still has.
    """

    def decorate(main: Main) -> Main:
        @wraps(main)
        def main_without_traceback(argv: list[str] | None = None) -> int:
            with recorded() as received:
                try:
                    try:
                        status = main(argv)
                        raise_if_pending()
                        return status
                    finally:  # here, where a reader gone is caught, rather than at exit (after --help too)
                        sys.stdout.flush()
                except BrokenPipeError:  # the reader of the output is gone (`| head -1`): stop quietly, as cat does
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes again at exit
                    return 1
                except KeyboardInterrupt:
                    pass
                except Exception:
                    if not received:
                        raise
            if threading.current_thread() is threading.main_thread():
                kill_children()
            if is_local_main_process():  # Ctrl-C reaches every process of the terminal's node
                print(f"interrupted; {advice}", file=sys.stderr)
            raise SystemExit(INTERRUPTED_EXIT)

        return main_without_traceback

    return decorate


@quiet_on_ctrl_c()
def run_pretrain(argv: list[str]) -> int:
    return run_recipe(PretrainConfig, argv, "pretrain.py", _pretrain, _pretrain_done_line)


def _pretrain(cfg: PretrainConfig) -> dict:
    from .train.engine import pretrain  # heavy imports only once the config is valid

    return pretrain(cfg)


def _pretrain_done_line(summary: dict, cfg: PretrainConfig) -> str:
    return f"done: {counted(summary['steps'], 'step')}; outputs in {summary['output_dir']}"


def run_recipe(cls: type[Config], argv: list[str], prog: str, train: Callable[[Config], dict],
               done_line: Callable[[dict, Config], str]) -> int:
    """`prog RECIPE.yaml [key=value ...]`: the config of class `cls`, `train(cfg)`'s run, and its closing line
    (`done_line(summary, cfg)`) from the main process; the exit status says how the run ended."""
    cfg = load_recipe(cls, argv, prog)
    summary = report_user_errors(lambda: train(cfg))
    if summary is None:
        return 1
    if summary.get("preempted"):
        if is_main_process():
            print(f"stopped early by SIGTERM after step {summary['steps']}, with a checkpoint in "
                  f"{summary['output_dir']}; run the same command again to resume", file=sys.stderr)
        return PREEMPTED_EXIT
    if is_main_process():
        print(done_line(summary, cfg))
    return 0


def report_user_errors(run: Callable[[], dict]) -> dict | None:
    """`run()`, or None after printing one `error:` line when the user's data, checkpoint, model name, disk space or
    batch size (for the GPU's memory) is at fault (the message says what to do; a traceback would only bury it).

    With several processes, most errors are the same in each (the node's files, the config), so the node's first
    process prints them. An error in the samples one process read, in a write it made (a full disk) or in its GPU's
    memory may concern it only: each prints its own, naming its rank.
    """
    from torch.cuda import OutOfMemoryError

    from .data.info import InfoError
    from .data.shards import StreamError
    from .models.loading import CheckpointError
    from .models.registry import ModelError
    from .train.checkpoint import CheckpointWriteError, ResumeError
    from .train.loop import NonFiniteLossError

    try:
        with warnings.catch_warnings():
            warnings.showwarning = partial(_show_own_warnings_as_lines, warnings.showwarning, set())
            return run()
    except (ConfigError, InfoError, CheckpointError, ResumeError, CheckpointWriteError, ModelError,
            NonFiniteLossError, FileNotFoundError) as err:
        own = isinstance(err, (StreamError, CheckpointWriteError))
        if own or is_local_main_process():
            write_line(f"error{_rank_tag() if own else ''}: {without_worker_traceback(str(err))}", sys.stderr)
        return None
    except OutOfMemoryError as err:
        write_line(f"error{_rank_tag()}: {out_of_memory_message(err)}", sys.stderr)
        return None
    except OSError as err:
        if (message := disk_full_message(err, "a training run resumes from its newest checkpoint")) is None:
            raise
        write_line(f"error{_rank_tag()}: {message}", sys.stderr)
        return None


def out_of_memory_message(err: Exception) -> str:
    """torch's account of a failed GPU allocation, cut before its breakdown of the memory in use, and the settings
    that make a step need less."""
    account = str(err).split(" Including non-PyTorch memory")[0].strip()
    return (f"{account} Lower data.batch_size and raise optim.accum_steps by the same factor (the effective batch, "
            "and so the LR, stay the same), or set run.grad_checkpointing=true; then run the same command again")


def _show_own_warnings_as_lines(show_other: Callable, shown: set[str], message, category, filename, lineno,
                                file=None, line=None) -> None:
    """Our warnings speak to the user (a broken shard, a setting that cannot apply): one `warning:` line, without
    the source line Python adds, once per run (`shown`: Python's own once-per-place memory is reset whenever a
    library changes the warning filters, and shards are resolved again for each evaluation). Rank 0 says what every
    rank would say; a `SampleWarning` concerns the samples of the process that gives it, which says it with its
    rank. Other libraries' warnings keep Python's format, which points at their code."""
    from .data.shards import SampleWarning  # imported already: `report_user_errors` installs this hook

    if Path(filename).is_relative_to(PACKAGE_DIR):
        own = issubclass(category, SampleWarning)
        if (own or is_main_process()) and str(message) not in shown:
            shown.add(str(message))
            write_line(f"warning{_rank_tag() if own else ''}: {message}", sys.stderr if file is None else file)
    else:
        show_other(message, category, filename, lineno, file, line)


def without_worker_traceback(message: str) -> str:
    """The original message of an error a DataLoader worker raised, which torch re-raises wrapped as
    "Caught E in DataLoader worker process N. Original Traceback ... pkg.E: message"."""
    if "\nOriginal Traceback" not in message:
        return message
    return message.rstrip().splitlines()[-1].split(": ", 1)[-1]


def is_local_main_process() -> bool:
    """The first process on its node (or a plain single process), from the launcher's environment."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def _rank_tag() -> str:
    """` (rank R of N)` in a launched job of several processes, else nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f" (rank {os.environ.get('RANK', '0')} of {world})" if world > 1 else ""
