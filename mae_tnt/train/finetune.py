"""Fine-tuning, linear probing and kNN evaluation of a pretrained encoder: one loop for CPU, GPU, DDP and DeepSpeed.

Fine-tuning follows MAE's recipe: AdamW with layer-wise LR decay (timm's `param_groups_layer_decay` over the
model's `group_matcher`), RandAugment per sample, then random erasing and mixup/cutmix on the normalised device batch,
label smoothing, warmup + cosine by global step. The linear probe trains `BatchNorm1d(affine=False)` + Linear with
LARS on a frozen encoder kept in eval mode (MAE #54). kNN needs no training (`mae_tnt.train.knn`).

Randomness is reproducible without saved RNG state: each sample's augmentation is seeded by the stream; each
micro-step reseeds torch (drop path, erasing noise) and Python/NumPy (timm's erasing boxes and mixup draws) from
(seed, rank, micro-step). The pieces shared with pretraining: `build_accelerator`, `derive_plan`, `seed_step`,
`TrainingRun` and `Window`.

References: facebookresearch/mae `main_finetune.py`, `engine_finetune.py`, `main_linprobe.py`, `util/lars.py`;
timm `train.py` (Mixup, RandomErasing, ModelEmaV3, SoftTargetCrossEntropy); accelerate `complete_cv_example.py`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import set_fused_attn
from timm.optim import Lars
from timm.utils import ModelEmaV3
from torch import nn

from ..atomic import replace_dir, restore_aside, temporary_name, write_json_atomic
from ..config import ConfigError, to_dict
from ..data.loader import build_train_stream, data_shards, eval_batches, make_loader
from ..data.shards import ShardError, StreamError, info_directory, labeled_classes
from ..data.transforms import normalize
from ..finetune_config import FinetuneConfig
from ..models import create_model
from ..models.loading import (
    FROZEN_MASTERS_FILE,
    STATE_FILE,
    read_state_dict,
    save_weights,
    without_wrapper_prefixes,
)
from ..text import counted
from .augment import BatchAugment, FinetuneTransform, build_criterion, seeded_global_rngs
from .checkpoint import (
    bare_model,
    find_checkpoints,
    fresh_directory,
    frozen_fp32_copies,
    master_state_dict,
    save_checkpoint,
    write_failures_explained,
)
from .init import (
    attach_probe_head,
    init_head,
    load_init,
    recorded_init,
    reestimate_stem_norms,
    stale_stem_norm_note,
)
from .knn import (
    accuracy_counts,
    knn_accuracy_on_shards,
    reported_ks,
    require_labeled_shards,
    shown_eval_batches,
    topk_text,
)
from .launch import build_accelerator, configure_deepspeed, uses_deepspeed
from .loop import (
    Preemption,
    TrainingRun,
    Window,
    accumulate_step,
    raise_if_nonfinite,
    seed_step,
    timed,
    write_run_config,
)
from .metrics import MetricsLogger, main_process_lines, step_progress
from .optim import build_adamw
from .resume import of_another_run, resolve_resume
from .run_lock import claim_run_directory, given_back_on_failure, released_at_end
from .schedule import derive_plan
from .superseded import best_weights_step, set_aside_previous_run

EMA_FILE = "ema.safetensors"


def resolve_num_classes(cfg: FinetuneConfig, log=print) -> int:
    """`model.num_classes`, or the length of the `classes` list in the train shards' `_info.json` (their own, or
    `data.info` for remote and `pipe:` shards)."""
    classes = train_classes(cfg)
    info_file = f"{info_directory(cfg.data.train, cfg.data.info)}/_info.json"
    if cfg.model.num_classes is not None:
        if classes and len(classes) != cfg.model.num_classes:
            message = (f"model.num_classes={cfg.model.num_classes} but {info_file} lists "
                       f"{len(classes)} classes; set model.num_classes=null to size the head from the shards")
            if cfg.model.num_classes < len(classes):  # labels would index past the head at the first batch
                raise ShardError(message)
            extra = cfg.model.num_classes - len(classes)  # allowed: labels all fit; those outputs are never a target
            log(f"warning: {message} (the head's last {extra} outputs are never a target)")
        return cfg.model.num_classes
    if classes is None:
        raise ShardError(f"cannot tell the class count of {cfg.data.train} (no _info.json): set model.num_classes, "
                         "or data.info to a local copy of the shards' _info.json")
    return len(classes)


def head_class_names(cfg: FinetuneConfig, num_classes: int) -> list[str] | None:
    """What the head's outputs stand for, in label order: the train shards' class names when they size the head
    (checkpoints record them, and exports pass them on as timm's `label_names`)."""
    classes = train_classes(cfg)
    return list(classes) if classes and len(classes) == num_classes else None


def train_classes(cfg: FinetuneConfig) -> list[str] | None:
    """The class names in the train shards' `_info.json` (their own, or `data.info`); None without one."""
    return labeled_classes(cfg.data.train, cfg.data.info, cfg.data.split, "data.split", cfg.mode)


def build_classifier(cfg: FinetuneConfig, num_classes: int, load: bool = True, log=print) -> nn.Module:
    """Create the classifier (num_classes = 0: bare encoder), load `cfg.init`, and set up its head for the mode."""
    kwargs = dict(num_classes=num_classes, img_size=cfg.model.img_size, drop_path_rate=cfg.model.drop_path)
    if cfg.model.global_pool is not None:
        kwargs["global_pool"] = cfg.model.global_pool
    torch.manual_seed(cfg.seed)  # the random parts (head, or everything for a baseline) are reproducible
    model = create_model(cfg.model.name, **kwargs)
    report = load_init(model, cfg.init, log, (cfg.data.mean, cfg.data.std)) if cfg.init and load else None
    if cfg.init is None:
        log(f"init: none, {'evaluating' if cfg.mode == 'knn' else 'training'} a randomly initialised encoder")
    if report is None or "head.weight" in report.missing:
        init_head(model.head, cfg.model.head_init_std)
    if cfg.mode in ("knn", "linprobe") and report is not None and "fc_norm.weight" in report.missing:
        # The frozen encoder never trains that norm: it stays at its initial 1 and 0 (MAE issue #186).
        feature = "kNN feature" if cfg.mode == "knn" else "feature the probe reads"
        log(f"note: with model.global_pool=avg the {feature} is the mean token through a fresh fc_norm, not the "
            f"checkpoint's final norm; model.global_pool=token gives the pretrained feature (as demo_{cfg.mode}_vit"
            ".yaml)")
    if report is not None and (note := stale_stem_norm_note(model, report, cfg.model.bn_reestimate_batches)):
        log(note)
    if cfg.mode == "linprobe":
        attach_probe_head(model, cfg.model.head_init_std)
    return model


def build_lars(model: nn.Module, *, lr: float, weight_decay: float, momentum: float, trust_coeff: float) -> Lars:
    """timm LARS over the trainable parameters; as in MAE's LARS, 1-D ones get neither adaptation nor decay."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay, "always_adapt": True},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0, "always_adapt": False},
    ]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=momentum, trust_coeff=trust_coeff)


def build_optimizer(model: nn.Module, cfg: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    """LARS or AdamW (with layer-wise decay when fine-tuning) over the trainable parameters."""
    o = cfg.optim
    if o.name == "lars":
        return build_lars(model, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum, trust_coeff=o.trust_coeff)
    layer_decay = o.layer_decay if cfg.mode == "finetune" else None
    return build_adamw(model, lr=lr, weight_decay=o.weight_decay, betas=tuple(o.betas), fused=o.fused,
                       layer_decay=layer_decay)


def seed_micro_step(seed: int, rank: int, micro: int) -> int:
    """Seed torch for the micro-step (`seed_step`) and return the same value for Python/NumPy draws."""
    seed_step(seed, rank, micro)
    return torch.initial_seed()


def refit_stem_norms(model: nn.Module, cfg: FinetuneConfig, device: torch.device, log=print) -> None:
    """SReT: recompute the stem BatchNorm statistics on `cfg.model.bn_reestimate_batches` center-cropped train
    batches (the model's mode is kept)."""
    data = cfg.data
    shards = data_shards(data, "train", verify=False)
    batches = eval_batches(shards, cfg.model.img_size, data.batch_size,
                           max_samples=cfg.model.bn_reestimate_batches * data.batch_size)
    # Rows labelled -1 pad a batch past the split's end or in place of an undecodable image: zeros, not data
    real = (images[labels >= 0] for images, labels in batches if (labels >= 0).any())
    seen = reestimate_stem_norms(model, (normalize(images.to(device), data.mean, data.std) for images in real))
    log(f"init: re-estimated the stem BatchNorm statistics on {seen} whole {cfg.model.img_size}-px train images "
        f"(model.bn_reestimate_batches={cfg.model.bn_reestimate_batches})")


def refuse_init_inside_output_dir(cfg: FinetuneConfig) -> None:
    """An init inside run.output_dir (outside its superseded/) is the run this one would resume or set aside."""
    if not cfg.init:
        return
    out, init = Path(cfg.run.output_dir).resolve(), Path(cfg.init).resolve()
    if init.is_relative_to(out) and not init.is_relative_to(out / "superseded"):
        raise ConfigError(f"init={cfg.init} lies inside run.output_dir={cfg.run.output_dir}, the run that this "
                          f"{cfg.mode} run would resume or, with run.resume=none, set aside; give it a directory of "
                          f"its own, e.g. run.output_dir={cfg.run.output_dir.rstrip('/')}_{cfg.mode}")


class FinetuneRun(TrainingRun):
    """Owns the state of one fine-tuning or linear-probe run."""

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.acc = build_accelerator(cfg)
        self.out, self.is_main = Path(cfg.run.output_dir), self.acc.is_main_process
        self.log = main_process_lines(self.is_main)
        self.device, self.rank, self.world = self.acc.device, self.acc.process_index, self.acc.num_processes
        transform = FinetuneTransform(cfg.model.img_size, cfg.data.crop_scale, cfg.augment.rand_augment, cfg.data.mean)
        self.stream = build_train_stream(cfg.data, transform, seed=cfg.seed, rank=self.rank, world_size=self.world)
        self.plan = derive_plan(cfg, self.world, self.stream.batches_per_epoch())
        self.num_classes = resolve_num_classes(cfg, self.log)
        self.class_names = head_class_names(cfg, self.num_classes)
        if cfg.data.val:
            require_labeled_shards(cfg.data, f"{cfg.mode} validation")
        refuse_init_inside_output_dir(cfg)
        claim_run_directory(self.out, self.acc)  # once the run is known to start: a refused one leaves no folder
        with given_back_on_failure(self.out):  # nor does one whose set-up fails, e.g. on a wrong init path
            self._set_up(cfg)

    def _set_up(self, cfg: FinetuneConfig) -> None:
        """Everything that follows the claim on the run directory: resume or init, model, optimizer, evaluation."""
        if self.is_main:  # before anything reads best/ or sets the run aside
            restore_aside(self.out / "best")
        checkpoint = resolve_resume(cfg.run.resume, self.out, self.log, self.is_main,
                                    check_fresh_start=lambda: recorded_init(cfg.init))  # a wrong init moves nothing
        # The checkpoint actually read, for config.yaml and the checkpoints; the caller's config stays as given.
        self.cfg = cfg = replace(cfg, init=recorded_init(cfg.init, checkpoint.state if checkpoint else None))
        set_fused_attn(cfg.run.fused_attn)
        model = build_classifier(cfg, self.num_classes, load=checkpoint is None, log=self.log)
        model.set_grad_checkpointing(cfg.run.grad_checkpointing)
        model = model.to(self.device, memory_format=self.memory_format)
        if cfg.model.bn_reestimate_batches and checkpoint is None:
            refit_stem_norms(model, cfg, self.device, self.log)
        optimizer = build_optimizer(model, cfg, self.plan.peak_lr)
        self.input_dtype = configure_deepspeed(self.acc, cfg, model)  # DeepSpeed's half modes need half inputs
        self.frozen_masters = frozen_fp32_copies(model) if self.input_dtype is not None else {}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # ZeRO-3 empties them in prepare
        self.model, self.optimizer = self.acc.prepare(torch.compile(model) if cfg.run.compile else model, optimizer)
        self.unwrapped = bare_model(self.acc, self.model)
        self.ema = self._build_ema()
        self.criterion = build_criterion(cfg.augment)
        self.augment = BatchAugment(cfg.augment, self.num_classes, self.device)
        self.val_shards = data_shards(cfg.data, "val") if cfg.data.val else []
        self.step, self.best, self.window = 0, {}, Window(self.device)
        self._describe_run(trainable)
        if checkpoint is not None:
            self._resume(checkpoint)
        self.write_config()

    def _build_ema(self) -> ModelEmaV3 | None:
        if not self.cfg.optim.ema_decay:
            return None
        if uses_deepspeed(self.acc):
            raise ConfigError("optim.ema_decay is not supported under DeepSpeed (its engine holds sharded or half "
                             "weights); use DDP, or set optim.ema_decay=null")
        return ModelEmaV3(self.unwrapped, decay=self.cfg.optim.ema_decay)

    def _describe_run(self, trainable: int) -> None:
        if not self.is_main:
            return
        o = self.cfg.optim
        size = f"{trainable / 1e6:.2f} M" if trainable >= 10_000 else f"{trainable}"  # a probe head can be tiny
        self.log(f"{self.cfg.mode} {self.cfg.model.name} ({counted(self.num_classes, 'class')}, {size} parameters "
                 f"trainable) in {self.out}")
        decay = f", layer decay {o.layer_decay:g}" if self.cfg.mode == "finetune" and o.layer_decay else ""
        self.log(self.plan_line(f" ({o.name}{decay})"))

    def _resume(self, checkpoint) -> None:
        best_written_at = best_weights_step(self.out)  # read before the main process may set `best/` aside
        self.restore(checkpoint)
        self.best = checkpoint.state.get("best", self.best)
        if of_another_run(checkpoint, self.out) and "weights" in self.best:
            self.log(f"note: the best weights so far (val top-1 {self.best['val_acc1']:.2f} at step "
                     f"{self.best['step']}) are in {checkpoint.path.parent.parent / 'best'}; this run's best/ starts "
                     "at its next validation")
            self.best = {}
        if best_written_at is not None and best_written_at > self.step and "weights" in self.best:
            # A later step of the continuation set aside replaced the weights this record describes.
            self.log(f"warning: best/ held step {best_written_at}, past this continuation; the best weights up to "
                     f"step {self.step} (val top-1 {self.best['val_acc1']:.2f} at step {self.best['step']}) are gone "
                     "with it, so best/ restarts at the next validation")
            self.best = {}
        if self.frozen_masters:  # taken from the fresh model, not the checkpoint's; without its file, the module's
            frozen = checkpoint.path / FROZEN_MASTERS_FILE  # 16-bit copies serve
            self.frozen_masters = read_state_dict(frozen) if frozen.exists() else {}
        if self.ema is not None:
            if (checkpoint.path / EMA_FILE).exists():
                self.ema.module.load_state_dict(read_state_dict(checkpoint.path / EMA_FILE))
            else:
                self.log(f"warning: {checkpoint.path} holds no {EMA_FILE}; the EMA restarts from the weights")
                self.ema = self._build_ema()
        self.log(f"resumed from {checkpoint.path} at step {self.step} (epoch {self.stream.state.epoch})")

    def set_train_mode(self) -> None:
        self.model.train()
        if self.cfg.mode == "linprobe":
            # The frozen encoder stays in eval mode (no drop path, fixed statistics); only the probe's BatchNorm
            # tracks statistics (MAE #54 calls train() on everything).
            self.model.eval()
            self.unwrapped.head.train()

    def micro_step(self, batch: dict, micro: int) -> torch.Tensor:
        self.check_labels(batch)
        images = self.device_images(batch["images"])
        labels = batch["labels"].to(self.device, non_blocking=True)
        with seeded_global_rngs(seed_micro_step(self.cfg.seed, self.rank, micro)):
            images, targets = self.augment(images, labels)
        if self.input_dtype is not None:
            images = images.to(self.input_dtype)
        loss, _ = accumulate_step(self.acc, self.model, self.optimizer,
                                  lambda: self.criterion(self.model(images).float(), targets),
                                  lr=self.lr(self.step), grad_clip=self.cfg.optim.grad_clip)
        return loss

    def train(self) -> dict:
        """Train to the stop step, evaluating after every epoch; returns a summary with the best accuracy."""
        self.preemption = Preemption(self.acc, self.cfg.run.preempt_check_every, self.log)
        self.save_due = False
        history: list[dict] = []
        self.window.restart_clock()
        with (released_at_end(self.out),
              self.open_metrics() as self.logger,
              self.preemption,
              step_progress(self.plan.stop_step, self.step, self.is_main, desc=self.cfg.mode) as bar):
            micro = self.step * self.cfg.optim.accum_steps
            while self.step < self.plan.stop_step and not self.preemption.stopping:
                self.set_train_mode()
                micro = self._run_batches(bar, micro)
                epoch_done = self.epoch_done()
                if epoch_done:
                    self.stream.state.start_epoch(self.stream.state.epoch + 1)
                with self.window.paused():
                    if (epoch_done or self.step >= self.plan.stop_step) and self.val_shards:
                        # At a data epoch's end that epoch's count labels the row, even where accumulation
                        # leaves the optimizer step count just short of it (7 steps of 7.75 an epoch).
                        history.append(self.evaluate_and_keep_best(self.stream.state.epoch if epoch_done
                                                                   else self.epoch))
                self.save_due = True
                self._save_if_due(micro)
        return {"steps": self.step, "history": history, "best": self.best, "output_dir": str(self.out),
                "preempted": self.preemption.cut_short(self.step, self.plan.stop_step)}

    def check_labels(self, batch: dict) -> None:
        """Refuse a training batch with a sample the head cannot learn (cross-entropy would fail with an index error,
        on a GPU a device-side assert), naming it; the labels are still on the host."""
        labels = batch["labels"]
        if (labels < 0).any():
            raise StreamError(f"sample {batch['keys'][int(labels.argmin())]} in {self.cfg.data.train} has no .cls "
                              "label: fine-tuning needs labeled shards")
        if int(labels.max()) >= self.num_classes:
            raise StreamError(f"sample {batch['keys'][int(labels.argmax())]} in {self.cfg.data.train} has label "
                              f"{int(labels.max())}, but the head has {self.num_classes} outputs: set "
                              "model.num_classes to the shards' class count")

    def _run_batches(self, bar, micro: int) -> int:
        """Micro-steps until the epoch ends, the stop step is reached or a stop is requested; returns `micro`."""
        with timed(make_loader(self.stream, pin_memory=self.device.type == "cuda"), self.window) as batches:
            for batch in batches:
                micro = self.train_batch(batch, micro, bar)
                if self.acc.sync_gradients:
                    self._after_optimizer_step(bar)
                    if self._stop_batches():
                        break  # `train` evaluates at an epoch end, then saves when no gradient is half accumulated
                self._save_if_due(micro)
        return micro

    def _after_optimizer_step(self, bar) -> None:
        """Update the EMA, log when due and mark a due checkpoint (saved by `_save_if_due`)."""
        if self.ema is not None:
            self.share_main_buffers()
            self.ema.update(self.unwrapped, step=self.step)
        if self.log_due():
            self.logger.log(self.close_log_window(bar))
        if self.step % self.cfg.run.checkpoint_every == 0:
            self.save_due = True

    def _stop_batches(self) -> bool:
        return self.step >= self.plan.stop_step or self.preemption.should_stop(self.step) or self.epoch_done()

    def _save_if_due(self, micro: int) -> None:
        """Save a due checkpoint once no gradient is half accumulated, so that a resume starts accumulating where
        the run did: an epoch of 31.25 optimizer steps ends a micro-batch into step 32, which saves it."""
        if self.save_due and micro % self.cfg.optim.accum_steps == 0:
            raise_if_nonfinite(self.acc, self.window, self.out, self.cfg.optim.accum_steps)
            with self.window.paused():
                self.save()
            self.save_due = False

    def evaluate_and_keep_best(self, epoch: float) -> dict:
        """Top-1/top-5 of the model (and its EMA) on the val shards, a row labelled `epoch`; the best weights go to
        `best/`."""
        metrics = {"step": self.step, "epoch": epoch}
        self.share_main_buffers()
        metrics.update(self.evaluate(self.model))
        candidates = [("model", metrics["val_acc1"])]
        if self.ema is not None:
            metrics.update({f"ema_{k}": v for k, v in self.evaluate(self.ema.module).items()})
            candidates.append(("ema", metrics["ema_val_acc1"]))
        source, acc1 = max(candidates, key=lambda c: c[1])
        if acc1 > self.best.get("val_acc1", -math.inf):
            weights = (master_state_dict(self.acc, self.model, self.frozen_masters) if source == "model"
                       else self.ema.module.state_dict())
            state_dict = without_wrapper_prefixes(weights)  # get_state_dict keeps torch.compile's
            self.best = {"val_acc1": acc1, "step": self.step, "epoch": metrics["epoch"], "weights": source}
            if self.is_main:
                self._write_best(state_dict)
        metrics["best_val_acc1"] = self.best["val_acc1"]
        self.logger.log(metrics)
        ema = f" (EMA {metrics['ema_val_acc1']:.2f})" if self.ema is not None else ""
        self.log(f"epoch {metrics['epoch']:g}: val {topk_text(metrics, 'val_acc')}{ema}; best "
                 f"{self.best['val_acc1']:.2f} at epoch {self.best['epoch']:g}")
        return metrics

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Accuracy (percent) and cross-entropy over the val shards, each rank scoring its share of the batches."""
        model.eval()
        ks = reported_ks(self.num_classes)
        sums = torch.zeros(len(ks) + 2, device=self.device)  # top-k hits for each k, count, loss sum
        batch_size = self.cfg.data.eval_batch_size or self.cfg.data.batch_size
        batches = shown_eval_batches(self.val_shards, self.cfg.model.img_size, batch_size, self.rank, self.world,
                                     "validation")
        for images, labels in batches:
            images = self.device_images(images)
            if self.input_dtype is not None and model is self.model:
                images = images.to(self.input_dtype)
            if int(labels.max()) >= self.num_classes:  # cross-entropy would fail with an index error
                raise StreamError(f"{self.cfg.data.val} holds label {int(labels.max())}, but the head has "
                                 f"{self.num_classes} classes: give train and val shards made into one directory "
                                 "(tools/make_shards.py), which keeps one class list")
            labels = labels.to(self.device)
            with self.acc.autocast():
                logits = model(images).float()  # [B, C]
            counts = accuracy_counts(logits, labels, ks)
            loss = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum")
            sums += torch.stack([*(counts[f"top{k}"] for k in ks), counts["count"], loss]).float()
        *hits, count, loss = self.acc.reduce(sums, "sum").tolist()
        self.set_train_mode()
        if count == 0:
            raise ShardError(f"no labeled sample of {self.cfg.data.val} could be read for validation; see the "
                             "warnings above, and check the shards with tools/inspect_shards.py")
        return {**{f"val_acc{k}": 100 * hit / count for k, hit in zip(ks, hits, strict=True)},
                "val_loss": loss / count, "val_samples": int(count)}

    def _write_best(self, state_dict: dict) -> None:
        """`best/`: model.safetensors + state.json, replaced atomically (a temporary directory, then a rename)."""
        best = self.out / "best"
        tmp = temporary_name(best)
        with write_failures_explained(tmp, best):
            fresh_directory(tmp)
            save_weights(state_dict, tmp / "model.safetensors")
            write_json_atomic(tmp / STATE_FILE, self._state())
            replace_dir(tmp, best)

    def _state(self) -> dict:
        """Self-description stored with every checkpoint and with `best/` (read by tools/export.py)."""
        return self.checkpoint_state(model=self.cfg.model.name, mode=self.cfg.mode, world_size=self.world,
                                     num_classes=self.num_classes, label_names=self.class_names,
                                     img_size=self.cfg.model.img_size, best=self.best, config=to_dict(self.cfg),
                                     plan=self.plan.__dict__)

    def save(self) -> Path:
        extra = {EMA_FILE: self.ema.module.state_dict()} if self.ema is not None else {}
        if self.frozen_masters:
            extra[FROZEN_MASTERS_FILE] = self.frozen_masters
        path = save_checkpoint(self.acc, self.model, self.optimizer, self._state(), self.stream.state.to_dict(),
                               self.out, self.cfg.run.keep_checkpoints, self.window, extra_weights=extra)
        self.log(f"saved checkpoint {path}")
        return path


def run_knn(cfg: FinetuneConfig) -> dict:
    """Weighted k-NN top-1/top-5 of frozen features: bank from the train split, queries from the val split."""
    acc = build_accelerator(cfg)
    log = main_process_lines(acc.is_main_process)
    out = Path(cfg.run.output_dir)
    if find_checkpoints(out):  # an earlier evaluation is set aside below; a training run (often init's) is not
        raise ConfigError(f"run.output_dir={out} holds a training run (checkpoints/), which a kNN evaluation would set "
                          f"aside; give the evaluation a directory of its own, e.g. run.output_dir={out}_knn")
    require_labeled_shards(cfg.data, "kNN evaluation")  # before the checkpoint is looked for
    cfg = replace(cfg, init=recorded_init(cfg.init))
    model = build_classifier(cfg, num_classes=0, log=log).to(acc.device).eval()
    if cfg.model.bn_reestimate_batches:
        refit_stem_norms(model, cfg, acc.device, log)
    data = cfg.data
    with acc.autocast():
        result = knn_accuracy_on_shards(
            model, data, img_size=cfg.model.img_size, batch_size=data.eval_batch_size or data.batch_size, k=cfg.knn.k,
            temperature=cfg.knn.temperature, max_train=cfg.knn.max_train, device=acc.device, rank=acc.process_index,
            world_size=acc.num_processes, gather=acc.gather, verify=True)
    claim_run_directory(out, acc)  # the run's only writes follow
    with released_at_end(out):
        if acc.is_main_process:
            set_aside_previous_run(out, log, why="mode=knn evaluates afresh")
            write_run_config(cfg, out, is_main=True)
            with MetricsLogger(out, True, to_dict(cfg)) as logger:
                logger.log({"step": 0, **result})
    capped = f", knn.k={cfg.knn.k} capped at the bank size" if result["knn_k"] < cfg.knn.k else ""
    log(f"kNN (k={result['knn_k']}{capped}, T={cfg.knn.temperature:g}) on {result['knn_val']} val images with a "
        f"bank of {result['knn_train']}: {topk_text(result, 'knn_top')}")
    return {**result, "output_dir": cfg.run.output_dir}


def finetune(cfg: FinetuneConfig) -> dict:
    """Run the configured mode; returns its summary."""
    if cfg.mode == "knn":
        return run_knn(cfg)
    return FinetuneRun(cfg).train()
