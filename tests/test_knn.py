"""Weighted kNN on hand-made features, rank-split evaluation batches, and the one call on labeled shards."""

import json
import math
import threading
import warnings
from pathlib import Path

import pytest
import torch
from shard_utils import drop_classes, write_shards, write_shards_damaged_at_their_size

from mae_tnt.cli import PACKAGE_DIR
from mae_tnt.config import DataConfig
from mae_tnt.data.loader import eval_batches, first_images
from mae_tnt.data.shards import SampleWarning, ShardError, resolve_shards
from mae_tnt.models import create_model
from mae_tnt.train.knn import (
    accuracy_counts,
    encoder_features,
    knn_accuracy,
    knn_accuracy_on_shards,
    knn_scores,
    topk_text,
)

ROOT = Path(__file__).resolve().parents[1]

# Three unit-length train features; the query sits on top of the only class-0 feature.
BANK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
BANK_LABELS = torch.tensor([0, 1, 1])
QUERY = torch.tensor([[1.0, 0.0]])  # cosine similarities to the bank: 1.0, 0.0, 0.6


def test_votes_are_exp_similarity_over_temperature_with_the_nearest_weighing_one():
    scores = knn_scores(BANK, BANK_LABELS, QUERY, k=3, temperature=0.1, num_classes=2)
    expected = torch.tensor([[math.exp(1.0 / 0.1), math.exp(0.0 / 0.1) + math.exp(0.6 / 0.1)]]) / math.exp(1.0 / 0.1)
    torch.testing.assert_close(scores, expected)


def test_a_low_temperature_keeps_the_votes_finite_and_ranked():
    # exp(1 / 0.005) overflows float32: unscaled, both classes would tie at inf. Scaled, class 1's two neighbours at
    # cosine 0.999 outvote class 0's one at 1.0 (2 e^-0.2 > 1).
    near = math.sqrt(1 - 0.999**2)
    bank = torch.tensor([[1.0, 0.0], [0.999, near], [0.999, -near]])
    scores = knn_scores(bank, torch.tensor([0, 1, 1]), QUERY, k=3, temperature=0.005, num_classes=2)
    assert torch.isfinite(scores).all() and scores.argmax().item() == 1


def test_weighting_beats_majority_and_a_high_temperature_restores_it():
    # T = 0.1: e^10 for class 0 against e^0 + e^6 for class 1. T = 1000: about one vote each, so 2 > 1.
    assert knn_scores(BANK, BANK_LABELS, QUERY, k=3, temperature=0.1, num_classes=2).argmax().item() == 0
    assert knn_scores(BANK, BANK_LABELS, QUERY, k=3, temperature=1000.0, num_classes=2).argmax().item() == 1


def test_k_limits_the_voters():
    scores = knn_scores(BANK, BANK_LABELS, QUERY, k=1, temperature=0.1, num_classes=2)
    torch.testing.assert_close(scores, torch.tensor([[1.0, 0.0]]))


def test_votes_are_float32_inside_a_bf16_autocast_region():
    # Fine-tuning's kNN mode and the pretraining monitor run inside accelerate's autocast (bf16 on GPU by default).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = knn_scores(BANK, BANK_LABELS, QUERY, k=3, temperature=0.07, num_classes=2)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, knn_scores(BANK, BANK_LABELS, QUERY, k=3, temperature=0.07, num_classes=2))


def test_knn_accuracy_on_hand_made_features():
    # Identity "encoder": 2 val rows; the first is right at top-1, the second only at top-2 (padding row ignored).
    train = [(BANK, BANK_LABELS)]
    val = [(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 0.0]]), torch.tensor([0, 1, -1]))]
    result = knn_accuracy(lambda x: x, train, val, k=3, temperature=0.1)
    assert result == {"knn_top1": pytest.approx(50.0), "knn_train": 3, "knn_val": 2, "knn_k": 3}  # no top-5 of 2
    assert knn_accuracy(lambda x: x, train, val, k=50, temperature=0.1)["knn_k"] == 3  # k capped at the bank


def test_neighbours_are_ranked_by_cosine_similarity_not_by_dot_product():
    # The query points along class 0's feature; class 1's is longer, so a raw dot product would rank it first.
    train = [(torch.tensor([[1.0, 0.0], [10.0, 10.0]]), torch.tensor([0, 1]))]
    val = [(torch.tensor([[1.0, 0.1]]), torch.tensor([0]))]
    assert knn_accuracy(lambda x: x, train, val, k=1, temperature=0.07)["knn_top1"] == 100.0


def test_the_knn_feature_is_the_encoders_pre_logits_of_the_images_normalised_with_the_data_statistics():
    torch.manual_seed(0)
    encoder = create_model("vit_test_patch8_32", num_classes=0).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean, std = [0.2, 0.3, 0.4], [0.5, 0.6, 0.7]
    pixels = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = encoder.forward_head(encoder.forward_features(pixels), pre_logits=True)
        torch.testing.assert_close(encoder_features(encoder, mean, std)(images), expected, rtol=1e-5, atol=1e-5)


def test_top5_is_reported_above_five_classes_and_with_five_voters_only():
    # One train feature per class at 0, 10, ..., 50 degrees: a query at 0 degrees ranks the classes 0, 1, ..., 5.
    angles = torch.deg2rad(torch.arange(6) * 10.0)
    bank = torch.stack([angles.cos(), angles.sin()], dim=1)  # [6, 2]
    queries = bank[[0, 0, 0]]  # labelled 0 (top-1 hit), 4 (top-5 hit) and 5 (missed)
    result = knn_accuracy(lambda x: x, [(bank, torch.arange(6))], [(queries, torch.tensor([0, 4, 5]))], k=6,
                          temperature=0.1)
    assert (result["knn_top1"], result["knn_top5"]) == (pytest.approx(100 / 3), pytest.approx(200 / 3))
    assert topk_text(result, "knn_top") == "top-1 33.33, top-5 66.67"
    few_voters = knn_accuracy(lambda x: x, [(bank, torch.arange(6))], [(queries, torch.tensor([0, 4, 5]))], k=4,
                              temperature=0.1)
    assert "knn_top5" not in few_voters  # classes without a vote would be ranked by chance
    assert topk_text({"val_acc1": 75.0}, "val_acc") == "top-1 75.00"


def test_accuracy_counts_ignore_padding_and_cap_k():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.5, 0.5]])
    counts = accuracy_counts(scores, torch.tensor([1, 1, -1]))
    assert {k: v.item() for k, v in counts.items()} == {"top1": 1, "top5": 2, "count": 2}


def labels_of(batches) -> list[int]:
    return torch.cat([labels for _, labels in batches]).tolist()


def test_eval_batches_split_ranks_evenly_and_cover_every_decodable_sample(tmp_path):
    write_shards(tmp_path, [7, 6], split="val", corrupt=frozenset({5}), num_classes=100)  # label = sample id
    shards = resolve_shards(str(tmp_path), "val")
    per_rank = [list(eval_batches(shards, 16, 4, rank, 2)) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2  # ceil(ceil(13 / 4) / 2)
    assert all(images.shape == (4, 3, 16, 16) for rank in per_rank for images, _ in rank)
    # Rank after rank, the rows are in shard order, as one process reads them; -1 pads the undecodable sample's
    # batch and the end.
    assert labels_of(per_rank[0] + per_rank[1]) == labels_of(eval_batches(shards, 16, 4)) == [
        0, 1, 2, 3, 4, 6, 7, -1, 8, 9, 10, 11, 12, -1, -1, -1]


def test_an_evaluation_names_the_first_samples_it_left_out_and_counts_the_rest(tmp_path):
    write_shards(tmp_path, [8], split="val", corrupt=frozenset({1, 2, 3, 4, 6}))
    with pytest.warns(UserWarning) as caught:
        labels = labels_of(eval_batches(resolve_shards(str(tmp_path), "val"), 16, 4))
    assert labels == [0, -1, -1, -1, 5, 7, -1, -1]  # each batch: its usable rows, then padding
    named = "; ".join(f"{tmp_path}/val-000000.tar:s00000{i} (made from img/{i}.png): unknown image format"
                      for i in (1, 2, 3))
    assert [str(w.message) for w in caught] == [
        f"evaluation left out 5 unreadable samples: {named}; and 2 more (tools/inspect_shards.py lists every one)"]
    # Given by the package, not by the loop that iterates, so the command line shows it as one `warning:` line
    assert Path(caught[0].filename).is_relative_to(PACKAGE_DIR)


def test_each_rank_reads_only_the_shards_its_batches_lie_in(tmp_path, monkeypatch):
    import mae_tnt.data.loader as loader

    write_shards(tmp_path, [8, 8, 8, 8], split="val", num_classes=100)
    shards = resolve_shards(str(tmp_path), "val")
    opened = []
    monkeypatch.setattr(loader, "read_samples", lambda url, start, *args, read=loader.read_samples, **kwargs: (
        opened.append((Path(url).name, start)) or read(url, start, *args, **kwargs)))
    for rank in range(2):
        assert labels_of(eval_batches(shards, 16, 4, rank, 2)) == list(range(16 * rank, 16 * rank + 16))
    assert opened == [("val-000000.tar", 0), ("val-000001.tar", 0), ("val-000002.tar", 0), ("val-000003.tar", 0)]
    opened.clear()
    # The first 10 samples, in 3 batches: rank 0 takes two, rank 1 one, of which the last 2 rows are padding.
    assert [labels_of(eval_batches(shards, 16, 4, rank, 2, max_samples=10)) for rank in range(2)] == [
        list(range(8)), [8, 9, -1, -1, -1, -1, -1, -1]]
    assert opened == [("val-000000.tar", 0), ("val-000001.tar", 0)]


def test_samples_after_a_break_keep_their_positions_so_every_rank_count_gives_the_same_rows(tmp_path):
    write_shards_damaged_at_their_size(tmp_path, "val")  # s000003-s000007 of the first shard are lost
    shards = resolve_shards(str(tmp_path), "val")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = labels_of(eval_batches(shards, 16, 3))
        two = labels_of([batch for rank in range(2) for batch in eval_batches(shards, 16, 3, rank, 2)])
    # Batches of 3: [0 1 2] [3 4 5] [6 7 8] ...; a batch's decodable rows come first.
    assert one == two[: len(one)] == [0, 1, 2, -1, -1, -1, 8, -1, -1, 9, 0, 1, 2, 3, 4, 5, -1, -1]


def test_an_evaluation_names_a_shard_damaged_without_changing_its_size_and_scores_what_precedes_the_break(tmp_path):
    """The start trusts a shard of its recorded size unread (bit rot keeps the size); the evaluation meets the break."""
    victim = write_shards_damaged_at_their_size(tmp_path, "val")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = torch.cat([labels for _, labels in eval_batches(resolve_shards(str(tmp_path), "val"), 16, 4)])
    assert [str(w.message) for w in caught if "broke" in str(w.message)] == [
        f"{victim} broke (it ended after 3 of its 8 samples); its samples after the break are skipped"]
    kept = [*range(3), *range(8, 16)]  # s000003-s000007 are lost with the break
    assert sorted(labels[labels >= 0].tolist()) == sorted(i % 10 for i in kept)


def run_as_ranks(world: int, work) -> list:
    """`work(rank, gather)` on `world` threads, `gather` concatenating a tensor over them rank after rank, as
    `accelerator.gather` does over processes."""
    barrier, slots, results = threading.Barrier(world), [None] * world, [None] * world

    def gather_for(rank):
        def gather(tensor):
            slots[rank] = tensor
            barrier.wait()
            joined = torch.cat(slots)
            barrier.wait()  # nobody overwrites a slot before everyone has read it
            return joined
        return gather

    def run(rank):
        results[rank] = work(rank, gather_for(rank))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_the_capped_bank_holds_the_first_samples_and_scores_alike_whatever_the_number_of_processes(tmp_path,
                                                                                                 monkeypatch):
    import mae_tnt.train.knn as knn

    write_shards(tmp_path, [16, 16, 8], split="train", size=32, num_classes=100)  # label = sample id
    write_shards(tmp_path, [20], split="val", size=32, num_classes=100)
    banks = []
    monkeypatch.setattr(knn, "knn_scores", lambda bank, bank_labels, queries, score=knn.knn_scores, **kwargs: (
        banks.append(bank_labels.tolist()) or score(bank, bank_labels, queries, **kwargs)))
    encoder = create_model("vit_test_patch8_32", num_classes=0)
    data = DataConfig(train=str(tmp_path), val=str(tmp_path))
    kwargs = dict(img_size=32, batch_size=4, k=5, max_train=25)
    alone = knn_accuracy_on_shards(encoder, data, **kwargs)
    for world in (2, 3):
        results = run_as_ranks(world, lambda rank, gather, world=world: knn_accuracy_on_shards(
            encoder, data, **kwargs, rank=rank, world_size=world, gather=gather))
        assert all(result == alone for result in results)
    assert banks == [list(range(25))] * 6  # one process, then every rank of two and of three


def test_a_break_is_each_ranks_own_warning_only_where_each_rank_reads_its_own_share(tmp_path):
    """Several ranks' eval batches are theirs alone: each one says what broke under it (with its rank). One process,
    and the reconstruction images every rank reads alike, speak for all (rank 0 says it)."""
    write_shards_damaged_at_their_size(tmp_path, "val")
    shards = resolve_shards(str(tmp_path), "val")
    reads = {"two ranks": lambda: list(eval_batches(shards, 16, 4, 0, 2)),
             "one process": lambda: list(eval_batches(shards, 16, 4)),
             "first images": lambda: first_images(shards, 12, 16)}
    categories = {}
    for name, read in reads.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            read()
        [categories[name]] = [w.category for w in caught if "broke" in str(w.message)]
    assert categories == {"two ranks": SampleWarning, "one process": UserWarning, "first images": UserWarning}


def test_knn_on_shards_caps_the_bank_and_restores_train_mode(tmp_path):
    write_shards(tmp_path, [40], split="train", size=32)
    write_shards(tmp_path, [20], split="val", size=32)
    encoder = create_model("vit_test_patch8_32", num_classes=0).train()
    data = DataConfig(train=str(tmp_path), val=str(tmp_path), batch_size=16)
    result = knn_accuracy_on_shards(encoder, data, img_size=32, batch_size=16, k=5, max_train=25)
    assert result["knn_train"] == 25 and result["knn_val"] == 20  # exactly the cap, though batches hold 16
    assert 0.0 <= result["knn_top1"] <= result["knn_top5"] <= 100.0  # 10 classes
    assert encoder.training


def test_knn_on_shards_shows_the_encoding_of_the_bank_and_queries_on_the_first_rank_only(tmp_path, capsys):
    write_shards(tmp_path, [40], split="train", size=32)
    write_shards(tmp_path, [20], split="val", size=32)
    data = DataConfig(train=str(tmp_path), val=str(tmp_path), batch_size=8)
    encoder = create_model("vit_test_patch8_32", num_classes=0)
    knn_accuracy_on_shards(encoder, data, img_size=32, batch_size=8, k=5, max_train=20)
    shown = [line.strip() for line in capsys.readouterr().err.splitlines()]  # a frame per line: capsys is no terminal
    bank, queries = ([line for line in shown if line.startswith(name)] for name in ("kNN bank:", "kNN queries:"))
    assert bank and all("/3 [" in line for line in bank)  # the 3 batches that hold the first 20 images
    assert queries and all("/3 [" in line for line in queries)  # 20 images in batches of 8
    knn_accuracy_on_shards(encoder, data, img_size=32, batch_size=8, k=5, rank=1, world_size=2,
                           gather=lambda t: torch.cat([t, t]))
    assert "kNN" not in capsys.readouterr().err


def test_knn_without_validation_shards_is_refused_saying_which_key_to_set(tmp_path):
    write_shards(tmp_path, [8], split="train", size=32)
    with pytest.raises(ShardError, match=r"^kNN evaluation needs labeled validation shards: set data.val$"):
        knn_accuracy_on_shards(create_model("vit_test_patch8_32", num_classes=0), DataConfig(train=str(tmp_path)),
                               img_size=32, batch_size=8)


def test_train_and_val_shards_with_different_class_lists_are_refused_before_encoding(tmp_path):
    write_shards(tmp_path / "a", [8], size=32)
    write_shards(tmp_path / "b", [8], split="val", size=32)
    info = json.loads((tmp_path / "b" / "_info.json").read_text())
    (tmp_path / "b" / "_info.json").write_text(json.dumps({**info, "classes": ["cat", "dog", "emu"]}))
    for val in (tmp_path / "b", tmp_path / "b" / "val-000000.tar", tmp_path / "b" / "val-{000000..000000}.tar"):
        data = DataConfig(train=str(tmp_path / "a"), val=str(val), batch_size=4)  # the _info.json beside the shards
        with pytest.raises(ShardError, match=r"kNN evaluation needs train and val shards labelled alike, but "
                                             r"data.train has 10 classes \(0, 1, 2, ...\) and data.val 3 "
                                             r"\(cat, dog, emu\)"):
            knn_accuracy_on_shards(create_model("vit_test_patch8_32", num_classes=0), data, img_size=32, batch_size=4)


@pytest.mark.skipif(not (ROOT / "data" / "fashion_mnist").exists(), reason="bundled Fashion-MNIST sample missing")
def test_knn_mode_of_the_downstream_runner_beats_chance_on_the_bundled_data(tmp_path, fresh_accelerate_state):
    from mae_tnt.config import load_config
    from mae_tnt.finetune_config import FinetuneConfig
    from mae_tnt.train.finetune import finetune

    cfg = load_config(FinetuneConfig, ROOT / "recipes" / "demo_knn_vit.yaml",
                      [f"run.output_dir={tmp_path}", "knn.max_train=1000"])
    result = finetune(cfg)  # random init: pixels through a random ViT already cluster Fashion-MNIST
    assert result["knn_train"] == 1000 and result["knn_val"] == 500 and result["knn_top1"] > 30.0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["knn_top1"] for row in rows] == [result["knn_top1"]]
    cfg.knn.max_train = 500
    again = finetune(cfg)  # a second evaluation into the same directory sets the first aside
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(row["knn_train"], row["knn_top1"]) for row in rows] == [(500, again["knn_top1"])]
    (earlier,) = (tmp_path / "superseded").iterdir()
    assert json.loads((earlier / "metrics.jsonl").read_text())["knn_train"] == 1000


def test_knn_mode_on_unlabeled_shards_fails_before_encoding_with_one_line(tmp_path, capsys, fresh_accelerate_state):
    from mae_tnt.finetune_cli import run_finetune

    write_shards(tmp_path / "shards", [8], size=16)
    write_shards(tmp_path / "shards", [8], split="val", size=16)
    drop_classes(tmp_path / "shards")
    argv = [str(ROOT / "recipes" / "demo_knn_vit.yaml"), f"data.train={tmp_path / 'shards'}",
            f"data.val={tmp_path / 'shards'}", f"run.output_dir={tmp_path / 'run'}", "model.img_size=16"]
    assert run_finetune(argv) == 1
    assert capsys.readouterr().err == (f"error: kNN evaluation needs labeled shards, but {tmp_path / 'shards'}"
                                       "/_info.json gives split 'train' (data.split) no classes; make labeled shards "
                                       "(an ImageFolder tree, a labeled list, IDX or CIFAR data) with "
                                       "tools/make_shards.py\n")
    assert run_finetune([*argv, f"init={tmp_path / 'no_such_checkpoint'}"]) == 1  # the labels are checked first
    assert "kNN evaluation needs labeled shards" in capsys.readouterr().err
