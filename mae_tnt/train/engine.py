"""The pretraining loop: one code path for CPU, one GPU, DDP and DeepSpeed, with exact resume.

The model returns the loss; this module alone calls backward, clips, sets the LR and steps. Every micro-step reseeds
torch from (seed, rank, micro-step), so masking noise, drop path and SReT's permutations are reproducible after a
resume without saving any RNG state. Host-device synchronisation happens only at log and checkpoint steps.

References: facebookresearch/mae `engine_pretrain.train_one_epoch`; accelerate `complete_cv_example.py`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from timm.layers import set_fused_attn

from ..config import PretrainConfig, to_dict
from ..data.device_decode import decode_batch
from ..data.loader import build_train_stream, data_shards, first_images, mae_transform, make_loader
from ..data.shards import ShardError, info_directory
from ..models import create_model
from ..models.masking import rounded_mask_ratio
from .checkpoint import Checkpoint, bare_model, save_checkpoint
from .knn import knn_accuracy_on_shards, require_labeled_shards, topk_text
from .launch import build_accelerator, configure_deepspeed, splits_weights
from .loop import Preemption, TrainingRun, Window, accumulate_step, raise_if_nonfinite, seed_step, timed
from .metrics import main_process_lines, step_progress
from .optim import build_adamw
from .recon import write_reconstructions
from .resume import resolve_resume
from .run_lock import claim_run_directory, given_back_on_failure, released_at_end
from .schedule import derive_plan, whole

RECON_IMAGES = 8


def check_eval_data(cfg: PretrainConfig, log=print) -> None:
    """Fail before training, not at the first reconstruction grid or kNN epoch, when `data.val` cannot be read or the
    kNN monitor has no labels; warn about truncated val shards."""
    data = cfg.data
    if data.val is None:
        if cfg.eval.knn_every:
            log("warning: eval.knn_every is set but data.val is null: no online kNN accuracy will be logged")
        return
    try:
        data_shards(data, "val")  # a broken shard is warned about now, not when evaluations read it
    except ShardError as err:
        raise ShardError(f"data.val: {err}") from err
    train_dir, val_dir = info_directory(data.train, data.info), info_directory(data.val, data.info)
    if train_dir is not None and val_dir is not None and train_dir.resolve() != val_dir.resolve():
        # Most often a demo recipe's bundled data.val left beside the user's own data.train
        uses = "the reconstruction grids" + (" and the kNN monitor" if cfg.eval.knn_every else "")
        log(f"note: data.val={data.val} is another shard directory than data.train's ({train_dir}): {uses} use its "
            "images; if it is a recipe's default, set data.val to held-out shards of your data (and data.mean and "
            "data.std to their statistics), or data.val=null to draw the grids from data.train")
    if cfg.eval.knn_every:
        try:
            require_labeled_shards(data, "the kNN monitor (eval.knn_every)")
        except ShardError as err:  # unlabeled data is MAE's usual case: the other fix is to go without the monitor
            raise ShardError(f"{err}; or set eval.knn_every=0 to pretrain without the monitor") from None


class Trainer(TrainingRun):
    """Owns the state of one pretraining run."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.acc = build_accelerator(cfg)
        self.out = Path(cfg.run.output_dir)
        self.is_main = self.acc.is_main_process
        self.log = main_process_lines(self.is_main)
        self.stream = build_train_stream(cfg.data, mae_transform(cfg.data, cfg.model.img_size), seed=cfg.seed,
                                         rank=self.acc.process_index, world_size=self.acc.num_processes)
        self.plan = derive_plan(cfg, self.acc.num_processes, self.stream.batches_per_epoch())
        check_eval_data(cfg, self.log)
        set_fused_attn(cfg.run.fused_attn)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank and every run of this recipe
        model = create_model(cfg.model.name, **cfg.model.build_kwargs())
        if rounded := rounded_mask_ratio(model.grid**2, cfg.model.mask_ratio):
            self.log(f"note: model.mask_ratio={cfg.model.mask_ratio} hides whole {model.unit}-px units: {rounded} at "
                     f"{cfg.model.img_size} px; a larger model.img_size gives finer steps")
        model.set_grad_checkpointing(cfg.run.grad_checkpointing)
        model = model.to(memory_format=self.memory_format)
        optimizer = build_adamw(model.to(self.acc.device), lr=self.plan.peak_lr,
                                weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas),
                                fused=cfg.optim.fused)
        if cfg.run.compile:
            model = torch.compile(model)
        configure_deepspeed(self.acc, cfg, model)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.step = 0
        self.window = Window(self.acc.device)
        self.grad_norm: torch.Tensor | None = None  # measured at clipped steps and log steps, logged when known
        self.reconstructed_step = -1  # the stop step is a recon_every step and a checkpoint: one grid for both
        self.recon_images: torch.Tensor | None = None  # read at the first grid: a run may never write one
        claim_run_directory(self.out, self.acc)  # once the run is known to start: a refused one leaves no folder
        with given_back_on_failure(self.out):  # nor does one whose set-up fails
            checkpoint = resolve_resume(cfg.run.resume, self.out, self.log, self.is_main)  # before any write
            self._describe_run()
            if checkpoint is not None:
                self._resume(checkpoint)
            self.write_config()

    def _describe_run(self) -> None:
        if self.is_main:
            self.log(f"run directory: {self.out}")
            self.log(self.plan_line())

    def _resume(self, checkpoint: Checkpoint) -> None:
        self.restore(checkpoint)
        self.log(f"resumed from {checkpoint.path} at step {self.step} (epoch {self.stream.state.epoch}, "
                 f"batch {self.stream.state.batches})")

    def batch_images(self, batch: dict) -> torch.Tensor:
        """The batch as normalised floats on the device; deferred JPEGs are decoded there in one batch."""
        images = batch["images"]
        if isinstance(images, list):
            images, dropped = decode_batch(images, self.cfg.model.img_size, self.acc.device)
            self.stream.state.skipped += dropped
        return self.device_images(images)

    def micro_step(self, batch: dict, micro: int) -> torch.Tensor:
        images = self.batch_images(batch)
        seed_step(self.cfg.seed, self.acc.process_index, micro)
        loss, grad_norm = accumulate_step(
            self.acc, self.model, self.optimizer, lambda: self.model(images, mask_ratio=self.cfg.model.mask_ratio)[0],
            lr=self.lr(self.step), grad_clip=self.cfg.optim.grad_clip, measure_norm=self.log_due(self.step + 1))
        if grad_norm is not None:
            self.grad_norm = grad_norm
        return loss

    def save(self) -> Path:
        # The grid first: a run stopped between the two resumes from the previous checkpoint and draws it again,
        # where a checkpoint written first would be resumed from without its grid ever being drawn.
        self.reconstructions()
        state = self.checkpoint_state(model=self.cfg.model.name, world_size=self.acc.num_processes,
                                      config=to_dict(self.cfg), plan=self.plan.__dict__)
        path = save_checkpoint(self.acc, self.model, self.optimizer, state, self.stream.state.to_dict(), self.out,
                               self.cfg.run.keep_checkpoints, self.window)
        self.log(f"saved checkpoint {path}")
        return path

    def reconstructions(self) -> None:
        """The main process writes the grid, once per step; under ZeRO-3 every rank runs its forward, which gathers
        the weights."""
        if self.reconstructed_step == self.step or not (self.is_main or splits_weights(self.acc)):
            return
        self.reconstructed_step = self.step
        if self.recon_images is None:
            shards = data_shards(self.cfg.data, "val" if self.cfg.data.val else "train", verify=False)
            self.recon_images = first_images(shards, RECON_IMAGES, self.cfg.model.img_size)
        model = bare_model(self.acc, self.model)
        path = self.out / "recon" / f"step_{self.step:08d}.png" if self.is_main else None
        with self.acc.autocast():
            write_reconstructions(model, self.recon_images.to(self.acc.device), self.cfg.data.mean,
                                  self.cfg.data.std, path, f"step {self.step}", self.cfg.seed)

    def train(self) -> dict:
        """Run until the stop step; returns a summary with the first and last logged losses."""
        self.window.restart_clock()
        self.last_saved = self.step
        with (released_at_end(self.out),
              self.open_metrics() as self.logger,
              Preemption(self.acc, self.cfg.run.preempt_check_every, self.log) as preemption):
            with step_progress(self.plan.stop_step, self.step, self.is_main) as bar:
                history = self._run_steps(preemption, bar)
            raise_if_nonfinite(self.acc, self.window, self.out, self.cfg.optim.accum_steps)
            if self.step != self.last_saved:
                self.save()
        return {"steps": self.step, "history": history, "output_dir": str(self.out),
                "preempted": preemption.cut_short(self.step, self.plan.stop_step)}

    def _run_steps(self, preemption: Preemption, bar) -> list[dict]:
        """Optimizer steps, epoch after epoch, until the stop step or an agreed stop; returns the metrics rows."""
        history: list[dict] = []
        micro = first_micro = self.step * self.cfg.optim.accum_steps
        while self.step < self.plan.stop_step and not preemption.stopping:
            loader = make_loader(self.stream, pin_memory=self.acc.device.type == "cuda")
            with timed(loader, self.window) as batches:
                for batch in batches:
                    started = time.perf_counter()
                    micro = self.train_batch(batch, micro, bar)
                    if self.cfg.run.compile and micro == first_micro + 1:
                        self.log(f"torch.compile: first step (compilation included) took "
                                 f"{time.perf_counter() - started:.1f} s")
                    if not self.acc.sync_gradients:
                        continue
                    history += self._after_optimizer_step(bar)
                    if self.step >= self.plan.stop_step or preemption.should_stop(self.step):
                        break
            if self.epoch_done():
                self.stream.state.start_epoch(self.stream.state.epoch + 1)
        return history

    def _after_optimizer_step(self, bar) -> list[dict]:
        """Log, evaluate, checkpoint and reconstruct when due; returns the metrics rows written.

        The kNN row comes before the checkpoint, which keeps the rows written so far: a run resumed from it does not
        evaluate that step again.
        """
        rows = []
        if self.log_due():
            rows.append(self._log_window(bar))
        saving = self.step % self.cfg.run.checkpoint_every == 0 and self.step < self.plan.stop_step
        with self.window.paused():
            if saving:
                raise_if_nonfinite(self.acc, self.window, self.out, self.cfg.optim.accum_steps)
            if self._knn_due():
                rows.append(self.knn_eval())
            if saving:
                self.save()
                self.last_saved = self.step
            elif self.cfg.run.recon_every and self.step % self.cfg.run.recon_every == 0:
                self.reconstructions()
        return rows

    def _log_window(self, bar) -> dict:
        metrics = self.close_log_window(bar)
        if self.grad_norm is not None:
            metrics["grad_norm"] = float(self.grad_norm)
        if torch.cuda.is_available():
            metrics["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.logger.log(metrics)
        return metrics

    def _knn_due(self) -> bool:
        """True at the step that completes every `eval.knn_every` epochs, and at the schedule's last step, which
        rounding may leave short of a period's end (needs labeled data.val)."""
        every = self.cfg.eval.knn_every
        if not every or self.cfg.data.val is None:
            return False
        period = self.plan.steps_per_epoch * every
        return whole(self.step / period) > whole((self.step - 1) / period) or self.step == self.plan.total_steps

    def knn_eval(self) -> dict:
        """Online kNN accuracy of the encoder, each rank encoding its share (ZeRO-3's collective forwards line up)."""
        encoder, cfg = bare_model(self.acc, self.model).encoder, self.cfg
        self.share_main_buffers()
        with self.acc.autocast():
            accuracy = knn_accuracy_on_shards(
                encoder, cfg.data, img_size=cfg.model.img_size, batch_size=cfg.data.batch_size, k=cfg.eval.knn_k,
                temperature=cfg.eval.knn_temperature, max_train=cfg.eval.knn_max_train, device=self.acc.device,
                rank=self.acc.process_index, world_size=self.acc.num_processes, gather=self.acc.gather)
        metrics = {"step": self.step, "epoch": self.epoch,
                   **accuracy}
        self.logger.log(metrics)
        self.log(f"step {self.step}: kNN {topk_text(accuracy, 'knn_top')}")
        return metrics


def pretrain(cfg: PretrainConfig) -> dict:
    """Build everything from the config and train; returns the run summary."""
    return Trainer(cfg).train()

