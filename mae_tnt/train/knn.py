"""Frozen-feature evaluation: top-k counts, feature extraction and weighted k-NN on rank-split eval batches.

The k-NN classifier is DINO's: features are L2-normalised, each query takes its k most cosine-similar train features,
and every neighbour votes for its class with weight exp(similarity / T). `knn_accuracy_on_shards` is the one call
that both fine-tuning's kNN mode and pretraining's online monitor (`eval.knn_every`) make.

Evaluation batches (`mae_tnt.data.loader.eval_batches`) are the same in number on every rank (padding rows carry
label -1 and are ignored), so forward passes that are collectives (DeepSpeed ZeRO-3) never hang; each rank reads and
decodes only its own contiguous share, and the gathered rows come back in shard order.

References: Caron et al., DINO (arXiv 2104.14294) `eval_knn.py` (k = 20, T = 0.07, weighted voting); Wu et al.,
"Unsupervised Feature Learning via Non-Parametric Instance Discrimination" (the exp(s / T) weighting).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DataConfig
from ..data.loader import data_shards, data_source, eval_batch_count, eval_batches
from ..data.shards import ShardError, labeled_classes
from ..data.transforms import normalize
from ..models.layers import in_mode
from .metrics import batch_progress

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
"""(images [B, 3, S, S], labels [B]) pairs; label -1 marks padding or an unlabeled sample."""

Gather = Callable[[torch.Tensor], torch.Tensor]
"""Concatenates a tensor over ranks along dim 0 (`accelerator.gather`)."""


def reported_ks(num_classes: int, voters: int = 5) -> tuple[int, ...]:
    """The top-k accuracies worth reporting: top-5 only above 5 classes, where it is not 100% by construction, and
    (for kNN) with at least 5 voters, since fewer leave classes without a vote, ranked by chance."""
    return (1, 5) if num_classes > 5 and voters >= 5 else (1,)


def topk_text(metrics: dict, prefix: str) -> str:
    """'top-1 A, top-5 B' of the percentages `{prefix}1` and `{prefix}5` in `metrics`, the latter when reported."""
    return ", ".join(f"top-{k} {metrics[f'{prefix}{k}']:.2f}" for k in (1, 5) if f"{prefix}{k}" in metrics)


def accuracy_counts(scores: torch.Tensor, labels: torch.Tensor,
                    ks: tuple[int, ...] = (1, 5)) -> dict[str, torch.Tensor]:
    """Correct predictions among the top-k scores for each k, over rows with a label >= 0 (device scalars).

    scores [N, C], labels [N]; k is capped at C. Returns {"top1": ..., "top5": ..., "count": ...} for ks (1, 5).
    """
    valid = labels >= 0
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # [N, kmax]
    hits = (top == labels.unsqueeze(1)) & valid.unsqueeze(1)  # [N, kmax]
    counts = {f"top{k}": hits[:, :k].any(dim=1).sum() for k in ks}
    counts["count"] = valid.sum()
    return counts


@torch.no_grad()
def extract_features(forward: Callable[[torch.Tensor], torch.Tensor], batches: Batches, device: torch.device,
                     gather: Gather | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features [N, D] (float32) and labels [N] of every labeled row, gathered over ranks if asked
    (`batches` from `eval_batches`: the rows come back in shard order)."""
    feats, labels = [], []
    for images, batch_labels in batches:
        out = forward(images.to(device, non_blocking=True)).float()  # [B, D]
        feats.append(F.normalize(out, dim=1))
        labels.append(batch_labels.to(device))
    feats_t, labels_t = torch.cat(feats), torch.cat(labels)
    if gather is not None and labels:
        feats_t, labels_t = gather(feats_t), gather(labels_t)  # rank after rank: in shard order
    keep = labels_t >= 0
    return feats_t[keep], labels_t[keep]


def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, *, k: int, temperature: float,
               num_classes: int, chunk: int = 512) -> torch.Tensor:
    """Class votes [Q, C] of weighted k-NN: each of the k nearest bank rows adds exp(cos / T) to its class, scaled by
    exp(-max cos / T) per query, which ranks the classes alike and keeps the weights finite (exp(1 / 0.01) is past
    float32's range, and MAE features often lie at a cosine near 1 from their neighbours).

    bank [N, D] and queries [Q, D] must be L2-normalised; queries are scored in chunks to bound memory. Scoring is in
    float32 even inside a bf16/fp16 autocast region, which would round similarities (and so reorder neighbours) and
    hand `scatter_add_` weights of another dtype than the votes.
    """
    votes = []
    for start in range(0, queries.shape[0], chunk):
        with torch.autocast(queries.device.type, enabled=False):
            sim = queries[start : start + chunk] @ bank.T  # [q, N] cosine similarities
        top_sim, top_idx = sim.topk(min(k, bank.shape[0]), dim=1)  # [q, k]
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # [q, k]; topk sorts, so column 0 is the max
        neighbours = bank_labels[top_idx]  # [q, k]
        votes.append(torch.zeros(sim.shape[0], num_classes, device=sim.device).scatter_add_(1, neighbours, weights))
    return torch.cat(votes)  # [Q, C]


def knn_accuracy(encoder_forward: Callable[[torch.Tensor], torch.Tensor], train_batches: Batches,
                 val_batches: Batches, k: int = 20, temperature: float = 0.07, device: torch.device | str = "cpu",
                 gather: Gather | None = None, max_train: int | None = None) -> dict[str, float]:
    """Weighted k-NN top-1 / top-5 accuracy (percent) of frozen features (see `reported_ks` for top-5).

    Args:
        encoder_forward: images on `device` -> features [B, D]; it normalises and pools (see `encoder_features`).
        train_batches, val_batches: (images, labels) batches; label -1 rows are ignored.
        gather: concatenates a tensor over ranks (`accelerator.gather`) when each rank saw part of the data.
        max_train: keep at most this many labeled train rows in the bank.

    Returns:
        knn_top1 (and knn_top5), knn_train and knn_val (the bank and query counts), and knn_k, the neighbours that
        voted: k, or the whole bank when it is smaller.
    """
    device = torch.device(device)
    bank, bank_labels = extract_features(encoder_forward, train_batches, device, gather)
    bank, bank_labels = bank[:max_train], bank_labels[:max_train]  # [N, D], [N]
    queries, labels = extract_features(encoder_forward, val_batches, device, gather)
    if bank.shape[0] == 0 or queries.shape[0] == 0:
        raise ShardError("kNN needs labeled train and val samples (.cls in the shards); found none")
    num_classes = int(max(bank_labels.max(), labels.max())) + 1
    scores = knn_scores(bank, bank_labels, queries, k=k, temperature=temperature, num_classes=num_classes)
    voters = min(k, bank.shape[0])
    ks = reported_ks(num_classes, voters)
    counts = accuracy_counts(scores, labels, ks)
    total = counts["count"].item()
    return {**{f"knn_top{k}": 100.0 * counts[f"top{k}"].item() / total for k in ks},
            "knn_train": bank.shape[0], "knn_val": total, "knn_k": voters}


def encoder_features(encoder: nn.Module, mean: list[float], std: list[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 images [B, 3, S, S] -> pooled features [B, D] of a bare encoder (num_classes = 0, so its forward ends in
    an identity head).

    The feature is the encoder's own pre-logits: the cls token after the final norm for ViT/TNT with token pooling
    (MAE's linear-probe feature), the normed mean token for SReT.
    """

    dtype = next(encoder.parameters()).dtype  # half precision under DeepSpeed's bf16/fp16 modes

    def forward(images: torch.Tensor) -> torch.Tensor:
        # Through __call__: ZeRO-3 gathers a module's own partitioned weights (ViT's pos_embed) in its call hooks
        return encoder(normalize(images, mean, std).to(dtype)).float()

    return forward


def require_labeled_shards(data: DataConfig, what: str) -> None:
    """Fail before any encoding when `data.val` is unset, the shards' `_info.json` lists no classes, or train and
    val name their classes differently (label 3 would mean another class in each)."""
    if data.val is None:
        raise ShardError(f"{what} needs labeled validation shards: set data.val")
    train, val = (labeled_classes(spec, data.info, split, key, what)
                  for spec, split, key in (data_source(data, "train"), data_source(data, "val")))
    if train is not None and val is not None and train != val:
        raise ShardError(f"{what} needs train and val shards labelled alike, but data.train has {len(train)} classes "
                         f"({_preview(train)}) and data.val {len(val)} ({_preview(val)}); make both with "
                         "tools/make_shards.py into one directory, which keeps one class list")


def _preview(classes: list[str]) -> str:
    return ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")


def knn_accuracy_on_shards(encoder: nn.Module, data: DataConfig, *, img_size: int, batch_size: int, k: int = 20,
                           temperature: float = 0.07, max_train: int | None = None, device: torch.device | str = "cpu",
                           rank: int = 0, world_size: int = 1, gather: Gather | None = None,
                           verify: bool = False) -> dict[str, float]:
    """Weighted k-NN accuracy of a bare encoder: bank from `data.train`, queries from `data.val` (both labeled).

    Each rank encodes only its share of the batches (`eval_batches`) and `gather` (`accelerator.gather`, needed when
    world_size > 1) joins the features, so every rank returns the same result. The bank holds at most `max_train`
    train images (only the batches that hold them are encoded). The encoder runs in eval mode; its mode is restored.
    Used by fine-tuning's kNN mode and by pretraining's online monitor (`eval.knn_every`).
    """
    require_labeled_shards(data, "kNN evaluation")
    train, val = (shown_eval_batches(data_shards(data, which, verify), img_size, batch_size, rank, world_size, desc,
                                     cap)
                  for which, desc, cap in (("train", "kNN bank", max_train), ("val", "kNN queries", None)))
    with in_mode(encoder, training=False):
        return knn_accuracy(encoder_features(encoder, data.mean, data.std), train, val, k, temperature, device,
                            gather if world_size > 1 else None, max_train)


def shown_eval_batches(shards: list, img_size: int, batch_size: int, rank: int, world_size: int, desc: str,
                       max_images: int | None = None) -> Batches:
    """This rank's `eval_batches` of the first `max_images` images (all by default), under a progress bar that
    appears when the first batch is asked for (not beside the bank's while that one runs)."""
    count = eval_batch_count(shards, batch_size, world_size, max_images)
    batches = eval_batches(shards, img_size, batch_size, rank, world_size, max_images)
    yield from batch_progress(batches, count, desc, enabled=rank == 0)
