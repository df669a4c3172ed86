"""The training stream: disjoint and complete across ranks and workers, equal batch counts, exact resume, bad input."""

import copy
import gzip
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import warnings
from functools import partial
from multiprocessing.process import BaseProcess

import pytest
import torch
from shard_utils import encode_png, write_shards, write_shards_damaged_at_their_size

from mae_tnt.config import DataConfig
from mae_tnt.data import shards as shards_module
from mae_tnt.data.info import InfoError, count_tar_samples, load_info, update_split
from mae_tnt.data.inspect import inspect_shards
from mae_tnt.data.inspect import main as inspect_main
from mae_tnt.data.loader import build_train_stream, eval_batches, first_images, mae_transform, make_loader
from mae_tnt.data.shards import ShardError, read_samples, resolve_shards
from mae_tnt.data.stream import ShardStream, StreamState
from mae_tnt.data.transforms import eval_resize, train_crop


def stream_for(shards, rank=0, world=1, workers=0, batch=4, seed=0, chunk=4):
    transform = partial(train_crop, size=16, scale=(0.2, 1.0))
    return ShardStream(shards, batch_size=batch, transform=transform, seed=seed, rank=rank, world_size=world,
                       num_workers=workers, chunk=chunk)


def consume(stream, limit=None):
    """Run one epoch (or `limit` batches) through a real DataLoader, recording positions like the engine does."""
    batches = []
    for batch in make_loader(stream):
        stream.state.record(batch, stream.num_workers)
        batches.append(batch)
        if limit and len(batches) == limit:
            break
    return batches


def keys(batches):
    return [k for b in batches for k in b["keys"]]


@pytest.fixture
def even(tmp_path):
    write_shards(tmp_path, [8, 8, 8, 8, 8, 8, 8, 8])
    return resolve_shards(str(tmp_path))


@pytest.mark.parametrize("chunk", [4, 3, 5])  # 16 samples per worker: chunks that do and do not divide it
def test_two_ranks_two_workers_are_disjoint_and_cover_the_epoch(even, chunk):
    seen = [keys(consume(stream_for(even, rank, 2, workers=2, chunk=chunk))) for rank in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0])) == len(seen[0]) == 32
    assert set(seen[0]) | set(seen[1]) == {f"s{i:06d}" for i in range(64)}


def test_each_chunk_is_shuffled_within_itself_and_the_seed_changes_the_order(even):
    def epoch_keys(seed):
        return keys(consume(stream_for(even, seed=seed, chunk=8)))

    stream = stream_for(even, chunk=8)
    sequence = [sample["__key__"] for shard in stream.shard_order(0) for sample in read_samples(shard.url)]
    start = stream.epoch_offset(0)
    in_range = [sequence[(start + position) % 64] for position in range(64)]  # one worker's range, unshuffled
    emitted = epoch_keys(0)
    chunks = [(emitted[i : i + 8], in_range[i : i + 8]) for i in range(0, 64, 8)]
    assert all(sorted(out) == sorted(read) for out, read in chunks)  # each chunk holds its 8 samples of the range
    assert sum(out != read for out, read in chunks) >= 6  # in a shuffled order
    assert epoch_keys(0) == emitted and epoch_keys(1) != emitted and sorted(epoch_keys(1)) == sorted(emitted)
    other_seed = stream_for(even, seed=1, chunk=8)  # the seed decides the shard order and the ranges' start too
    assert other_seed.shard_order(0) != stream.shard_order(0) and other_seed.epoch_offset(0) != start


def draw_image(data: bytes, rng) -> torch.Tensor:
    """A transform whose image is the sample RNG's first draw: [3, 2, 2] filled with it."""
    return torch.full((3, 2, 2), rng.randrange(256), dtype=torch.uint8)


def test_each_sample_draws_its_augmentation_from_its_own_epoch_rank_and_worker(even):
    def draws(rank, epoch, workers=2):
        # Chunks of one sample keep every range in stream order: batch b of every worker holds its positions 4b-4b+3.
        stream = ShardStream(even, batch_size=4, transform=draw_image, seed=0, rank=rank, world_size=2,
                             num_workers=workers, chunk=1)
        stream.state.start_epoch(epoch)
        return [b["images"][:, 0, 0, 0].tolist() for b in consume(stream)]  # per batch, each image's draw

    epoch0 = draws(0, 0)
    assert epoch0 == draws(0, 0)  # reproducible
    # Batches at the same positions of other ranks, workers (batches 0 and 1 come from workers 0 and 1) and epochs
    # draw other crops.
    assert epoch0[0] != epoch0[1] and epoch0 != draws(1, 0) and epoch0 != draws(0, 1)


def config_stream(root, rank=0, world=1, chunk=4):
    data = DataConfig(train=str(root), batch_size=4, num_workers=0, shuffle_chunk=chunk)
    return build_train_stream(data, mae_transform(data, 16), seed=0, rank=rank, world_size=world)


def test_the_streams_built_for_two_ranks_are_disjoint_and_cover_the_epoch(tmp_path):
    write_shards(tmp_path, [8] * 8)
    seen = [keys(consume(config_stream(tmp_path, rank, 2))) for rank in range(2)]
    assert len(set(seen[0])) == len(seen[0]) == len(set(seen[1])) == 32 and not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {f"s{i:06d}" for i in range(64)}


def test_the_built_stream_shuffles_in_chunks_of_data_shuffle_chunk(tmp_path):
    write_shards(tmp_path, [8] * 8)
    shards = resolve_shards(str(tmp_path))
    orders = {chunk: keys(consume(config_stream(tmp_path, chunk=chunk))) for chunk in (1, 8)}
    assert orders[1] != orders[8]  # the chunk shows in the order: the default 512 would shuffle all 64 as one
    for chunk, order in orders.items():
        assert order == keys(consume(stream_for(shards, chunk=chunk)))


def test_a_shard_is_opened_once_per_epoch_not_once_per_chunk(even, monkeypatch):
    from mae_tnt.data import stream as stream_module

    opened = []
    monkeypatch.setattr(stream_module, "read_samples",
                        lambda url, *args, **kwargs: opened.append(url) or read_samples(url, *args, **kwargs))
    consume(stream_for(even, chunk=2))  # 32 chunks over 8 shards
    # Every shard once, and the one the epoch's range starts inside once more, where the range wraps around to it.
    assert len(opened) <= len(even) + 1 and set(opened) == {shard.url for shard in even}


@pytest.mark.parametrize("processes, cpus, warned", [
    ("1", 2, None),
    ("1", 1, "data.num_workers=2 starts 2 loader workers on 1 CPU, where they compete"),
    ("2", 3, "data.num_workers=2 in each of 2 processes starts 4 loader workers on 3 CPUs, where they compete"),
])
def test_more_loader_workers_than_cpus_is_one_warning_of_ours_in_place_of_torchs(even, monkeypatch, processes, cpus,
                                                                               warned):
    """torch warns twice per loader, naming no setting, and misses the other processes of the node."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(consume(stream_for(even, workers=2))) == 16
    # UserWarnings only: Python 3.12 adds a DeprecationWarning when a process with threads (CUDA's) forks a worker
    ours = [str(w.message).split(";")[0] for w in caught if issubclass(w.category, UserWarning)]
    assert ours == ([warned] if warned else [])


def test_batches_leave_the_workers_stacked_channels_last(even):
    """`stack_images` copies each channels-last crop as it lies; the layout survives the trip out of a worker."""
    batches = consume(stream_for(even, workers=2), limit=2)
    assert [b["images"].shape for b in batches] == [(4, 3, 16, 16)] * 2
    assert all(b["images"].is_contiguous(memory_format=torch.channels_last) for b in batches)


def test_uneven_shards_give_every_rank_the_same_number_of_batches(tmp_path):
    write_shards(tmp_path, [10, 10, 10, 10, 3])
    shards = resolve_shards(str(tmp_path))
    counts = [len(consume(stream_for(shards, rank, 2, workers=2))) for rank in range(2)]
    assert counts[0] == counts[1] == stream_for(shards, 0, 2, workers=2).batches_per_epoch() == 4


def test_epochs_reshuffle_but_are_reproducible(even):
    def epoch_keys(epoch):
        stream = stream_for(even, workers=2)
        stream.state.start_epoch(epoch)
        return keys(consume(stream))

    assert epoch_keys(0) == epoch_keys(0)
    assert epoch_keys(0) != epoch_keys(1)
    assert sorted(epoch_keys(0)) == sorted(epoch_keys(1))


def epoch_keys_of(shards, epoch, chunk):
    stream = stream_for(shards, chunk=chunk)
    stream.state.start_epoch(epoch)
    return keys(consume(stream))


def test_each_epoch_reads_the_shards_in_an_order_of_its_own(even):
    """The epoch's offset alone only rotates the sample sequence; the shard shuffle must be seeded by the epoch too."""
    # Chunks of one sample: the single worker emits its range, the whole sequence from the offset on, unshuffled.
    epoch0, epoch1 = (epoch_keys_of(even, epoch, chunk=1) for epoch in (0, 1))
    assert epoch_keys_of(even, 0, chunk=1) == epoch0 and sorted(epoch1) == sorted(epoch0)
    assert epoch1 not in [epoch0[i:] + epoch0[:i] for i in range(64)]  # not one shard sequence, started elsewhere


def test_each_epoch_shuffles_its_chunks_with_a_permutation_of_its_own(even):
    """A chunk permutation seeded without the epoch would repeat every epoch at the same range positions."""

    def permutation(epoch):
        where = {key: position for position, key in enumerate(epoch_keys_of(even, epoch, chunk=1))}  # range order
        return [where[key] for key in epoch_keys_of(even, epoch, chunk=8)]  # range position of each emitted sample

    epoch0 = permutation(0)
    assert permutation(0) == epoch0 and epoch0 != list(range(64))
    assert all(sorted(epoch0[i : i + 8]) == list(range(i, i + 8)) for i in range(0, 64, 8))  # shuffled within chunks
    assert permutation(1) != epoch0


def test_the_samples_left_over_change_every_epoch_even_in_one_shard(tmp_path):
    # 25 samples, 2 workers of 3 batches of 4: one sample is left over each epoch; a fixed cut would always drop s24.
    write_shards(tmp_path, [25])
    every = {f"s{i:06d}" for i in range(25)}
    left_over = []
    for epoch in range(6):
        stream = stream_for(resolve_shards(str(tmp_path)), workers=2)
        stream.state.start_epoch(epoch)
        seen = keys(consume(stream))
        assert len(seen) == len(set(seen)) == 24
        (left,) = every - set(seen)
        left_over.append(left)
    assert len(set(left_over)) > 1, left_over


@pytest.mark.parametrize("workers, stop_after", [(0, 5), (2, 3), (2, 6), (3, 4)])
@pytest.mark.filterwarnings("ignore:data.num_workers=3 starts 3 loader workers")  # more than this machine's CPUs
def test_resume_mid_epoch_reproduces_the_exact_batches(even, workers, stop_after):
    full = consume(stream_for(even, workers=workers))
    first = stream_for(even, workers=workers)
    part = consume(first, limit=stop_after)
    resumed = stream_for(even, workers=workers)
    resumed.state = copy.deepcopy(first.state)
    rest = consume(resumed)
    assert keys(part + rest) == keys(full)
    for a, b in zip(part + rest, full, strict=True):
        assert torch.equal(a["images"], b["images"])  # augmentation is a function of the sample, not of history


def test_a_stream_state_comes_back_whole_from_json():
    state = StreamState(epoch=3, batches=5, positions={0: 12, 1: 8}, next_role=1, skipped=2)
    assert StreamState.from_dict(json.loads(json.dumps(state.to_dict()))) == state  # checkpoints store it as JSON


def test_resume_from_a_state_saved_as_json_reproduces_the_exact_batches(even):
    """Three batches of two workers stop with worker 1 next: a restored `next_role` of 0 would replay worker 0's."""
    full = consume(stream_for(even, workers=2))
    first = stream_for(even, workers=2)
    part = consume(first, limit=3)
    assert first.state.next_role == 1
    resumed = stream_for(even, workers=2)
    resumed.state = StreamState.from_dict(json.loads(json.dumps(first.state.to_dict())))
    assert keys(part + consume(resumed)) == keys(full)


def test_resume_does_not_decode_skipped_samples(even, monkeypatch):
    first = stream_for(even)
    consume(first, limit=6)
    decoded = []
    original = first.transform
    resumed = stream_for(even)
    resumed.state = copy.deepcopy(first.state)
    resumed.transform = lambda data, rng: decoded.append(1) or original(data, rng)
    consume(resumed)
    assert len(decoded) == 64 - 6 * 4


def test_corrupt_images_are_skipped_counted_and_batches_stay_full(tmp_path):
    write_shards(tmp_path, [8, 8, 8, 8], corrupt=frozenset({3, 17}))
    stream = stream_for(resolve_shards(str(tmp_path)), batch=4)
    with pytest.warns(UserWarning) as caught:
        batches = consume(stream)
    named = {str(w.message) for w in caught if str(w.message).startswith("skipped sample ")}
    assert named == {f"skipped sample {tmp_path}/train-000000.tar:s000003 (made from img/3.png): unknown image format",
                     f"skipped sample {tmp_path}/train-000002.tar:s000017 (made from img/17.png): unknown image format"}
    assert all(len(b["keys"]) == 4 for b in batches)
    assert stream.state.skipped == 2
    assert {"s000003", "s000017"}.isdisjoint(keys(batches))


def test_skipped_samples_are_named_with_their_reason_up_to_a_cap(tmp_path, monkeypatch):
    from mae_tnt.data import stream as stream_module

    monkeypatch.setattr(stream_module, "SKIPS_NAMED", 2)
    write_shards(tmp_path, [8, 8, 8, 8], corrupt=frozenset({3, 17, 20}))
    stream = stream_for(resolve_shards(str(tmp_path)), batch=4)
    with pytest.warns(UserWarning) as caught:
        consume(stream)
    named = [str(w.message) for w in caught if str(w.message).startswith("skipped sample ")]
    assert stream.state.skipped == 3 and len(named) == 2
    assert all(re.match(r"skipped sample \S+/train-00000[02]\.tar:s0000(03|17|20) \(made from img/(3|17|20)\.png\): .+",
                        message) for message in named)
    assert named[-1].endswith("; further skips are only counted (skipped_samples in the metrics)")


def test_a_shard_damaged_without_changing_its_size_is_named_when_training_meets_the_break(tmp_path):
    """The start of training trusts a shard of its recorded size without reading it (bit rot keeps the size)."""
    victim = write_shards_damaged_at_their_size(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = stream_for(resolve_shards(str(tmp_path)), batch=4)
        consume(stream)
    messages = [str(w.message) for w in caught]
    assert stream.state.skipped >= 5  # s000003 to s000007
    assert any(re.match(rf"{re.escape(str(victim))} broke \(.+\); its samples after the break are skipped and "
                        r"counted", message) for message in messages), messages


@pytest.mark.parametrize("recorded_sizes", [True, False])  # trusted by their size, or scanned at the start
def test_shards_truncated_or_deleted_during_the_run_are_named_skipped_and_counted(tmp_path, recorded_sizes):
    write_shards(tmp_path, [8, 8, 8, 8])
    names = [f"train-{i:06d}.tar" for i in range(4)]
    sizes = [(tmp_path / name).stat().st_size for name in names] if recorded_sizes else None
    update_split(tmp_path, "train", names, [8] * 4, shard_bytes=sizes)
    stream = stream_for(resolve_shards(str(tmp_path)), batch=4)  # intact when resolved
    truncated, deleted = tmp_path / names[1], tmp_path / names[2]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    deleted.unlink()
    batches = consume(stream)
    assert len(batches) == 8 and stream.state.skipped >= 8  # the deleted shard's 8, and the truncated one's rest
    named = [line for batch in batches for line in batch["breaks"]]
    for victim in (truncated, deleted):
        assert any(line.startswith(f"{victim} broke (") and line.endswith("counted (skipped_samples in the metrics)")
                   for line in named), named


def test_a_truncated_shard_is_warned_about_then_skipped_and_counted(tmp_path):
    write_shards(tmp_path, [8, 8, 8, 8])
    victim = tmp_path / "train-000001.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    readable = sum(1 for _ in read_samples(str(victim)))
    assert 0 < readable < 8
    with pytest.warns(UserWarning, match=r"train-000001.tar: .*re-create it. Until then, its samples after the break "
                                         r"are skipped \(training counts them in skipped_samples\)"):
        shards = resolve_shards(str(tmp_path))
    assert [shard.num_samples for shard in shards] == [8] * 4  # _info.json's counts: the epoch plan stays the same
    stream = stream_for(shards, batch=4)
    batches = consume(stream)
    assert len(batches) == 8 and all(len(b["keys"]) == 4 for b in batches)
    lost = {f"s{i:06d}" for i in range(8 + readable, 16)}  # train-000001 holds s000008..s000015
    assert not lost & set(keys(batches))
    # Each lost sample is skipped; the ones taken in their place may wrap around into the break again.
    assert stream.state.skipped >= 8 - readable
    assert stream.state.positions[0] - stream.state.skipped == 32  # every other position became a good sample

    labels = torch.cat([labels for _, labels in eval_batches(shards, img_size=16, batch_size=4)])
    assert (labels >= 0).sum() == 24 + readable  # evaluation reads past the break too

    with pytest.warns(UserWarning, match="its samples after the break are skipped"):
        beside_info = resolve_shards(f"{tmp_path}/train-{{000000..000003}}.tar")
    assert beside_info == shards  # counted by the _info.json beside the files, so the lost samples are counted too
    alone = tmp_path / "alone"
    alone.mkdir()
    for shard in tmp_path.glob("train-*.tar"):
        shutil.copy(shard, alone)
    with pytest.warns(UserWarning, match=rf"Until then, only its {readable} samples before the break are used"):
        pattern = resolve_shards(f"{alone}/train-{{000000..000003}}.tar")  # no _info.json to give its count
    assert [shard.num_samples for shard in pattern] == [8, readable, 8, 8]

    victim.write_bytes(b"")  # tarfile's reason names each decompressor it tried, one per line
    with pytest.warns(UserWarning) as caught:
        resolve_shards(str(tmp_path))
    assert len(caught) == 1 and "\n" not in str(caught[0].message), str(caught[0].message)


@pytest.mark.parametrize("local", [True, False])
def test_a_tar_cut_inside_a_member_yields_the_samples_before_it_and_the_reason(tmp_path, local):
    write_shards(tmp_path, [5])
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    shard.write_bytes(shard.read_bytes()[: last.offset_data + last.size // 2])  # the last sample's last member, cut
    url = str(shard) if local else f"pipe:cat {shard}"  # a seekable file, and a stream read once
    reasons = []
    samples = list(read_samples(url, on_break=reasons.append))
    assert [sample["__key__"] for sample in samples] == [f"s{i:06d}" for i in range(4)]
    assert samples[-1]["png"] == encode_png(3) and reasons == ["unexpected end of data"]


def test_pipe_urls_are_refused_unless_allowed(tmp_path):
    write_shards(tmp_path, [8, 8])
    marker = tmp_path / "ran"
    for spec in ("pipe:cat /etc/passwd", f"{{pipe:touch {marker},pipe:touch {marker}}}",  # the second after braces
                 f"PIPE:touch {marker}", f"Pipe:touch {marker}", f" pipe:touch {marker}"):  # URL schemes ignore case
        with pytest.raises(ShardError, match="data.allow_pipe=true"):
            shards = resolve_shards(spec, info=str(tmp_path), verify=False)
            consume(stream_for(shards, 0, 1, workers=0))
    assert not marker.exists()


def test_a_url_that_webdatasets_rewrite_rules_turn_into_a_pipe_is_refused_unless_allowed(tmp_path, monkeypatch):
    write_shards(tmp_path, [4])
    marker = tmp_path / "ran"
    monkeypatch.setenv("GOPEN_REWRITE", f"http://mirror.invalid/=pipe:touch {marker} && cat {tmp_path}/")
    url = "http://mirror.invalid/train-000000.tar"
    with pytest.raises(ShardError, match="data.allow_pipe=true"):
        resolve_shards(url, info=str(tmp_path))
    assert not marker.exists()
    assert len(consume(stream_for(resolve_shards(url, info=str(tmp_path), allow_pipe=True), 0, 1, workers=0))) > 0
    assert marker.exists()  # allowed, the rewritten command ran


def test_an_info_file_naming_shards_outside_its_directory_is_refused_before_anything_runs(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.chdir(tmp_path)  # the directory `.`: joined to it, a pipe: name stays a pipe: URL
    def list_shard(name):
        entry = {"num_samples": 1, "filenames": [name], "shard_lengths": [1]}
        (tmp_path / "_info.json").write_text(json.dumps({"splits": {"train": entry}}))

    for name in (f"pipe:touch {marker}", f"PIPE:touch {marker}", str(tmp_path / "elsewhere.tar"), "../up.tar"):
        list_shard(name)
        with pytest.raises(InfoError, match=rf"shard file name '{re.escape(name)}' is not a path inside \."):
            consume(stream_for(resolve_shards(".", verify=False), 0, 1, workers=0))
    assert not marker.exists()
    write_shards(tmp_path / "sub", [1])
    list_shard("sub/train-000000.tar")  # a sub-folder is inside
    assert [s.url for s in resolve_shards(".", verify=False)] == ["sub/train-000000.tar"]


def test_allowed_pipe_urls_stream_with_counts_from_a_local_info_file(tmp_path):
    write_shards(tmp_path, [8, 8, 8, 8])
    url = f"pipe:cat {tmp_path}/train-{{000000..000003}}.tar"
    with pytest.raises(ShardError, match="set data.info"):
        resolve_shards(url, allow_pipe=True)
    shards = resolve_shards(url, allow_pipe=True, info=str(tmp_path / "_info.json"))
    assert [(s.url, s.num_samples) for s in shards] == [(f"pipe:cat {tmp_path}/train-{i:06d}.tar", 8) for i in range(4)]
    seen = [keys(consume(stream_for(shards, rank, 2, workers=1))) for rank in range(2)]
    assert sorted(seen[0] + seen[1]) == [f"s{i:06d}" for i in range(32)]
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "my_info.json").write_text((tmp_path / "_info.json").read_text())
    (tmp_path / "copy" / "_info.json").write_text("{}")  # another dataset's: it must not be the one read
    with pytest.raises(ShardError, match=r"data.info=.*my_info.json is not an _info.json: give the _info.json"):
        resolve_shards(url, allow_pipe=True, info=str(tmp_path / "copy" / "my_info.json"))
    subset = resolve_shards(f"pipe:cat {tmp_path}/train-{{000003,000001}}.tar", allow_pipe=True, info=str(tmp_path))
    assert [s.num_samples for s in subset] == [8, 8]  # counts found by file name, so a subset works too


def test_info_counts_go_to_urls_by_file_name_else_by_position(tmp_path):
    write_shards(tmp_path, [3, 5, 7])
    url = "https://host/data/train-{000002,000000}.tar?download=1"
    assert [s.num_samples for s in resolve_shards(url, info=str(tmp_path), verify=False)] == [7, 3]
    renamed = resolve_shards("https://host/part-{0..2}", info=str(tmp_path), verify=False)
    assert [(s.url, s.num_samples) for s in renamed] == [(f"https://host/part-{i}", n) for i, n in enumerate([3, 5, 7])]
    with pytest.raises(ShardError, match=r"expands to 2 shard URLs but .* lists 3 shards for split 'train', and "
                                         r"'https://host/part-0' holds none of their file names"):
        resolve_shards("https://host/part-{0..1}", info=str(tmp_path), verify=False)


def test_a_failing_pipe_command_is_named_with_its_status_in_the_warning_and_the_error(tmp_path, monkeypatch):
    from mae_tnt.data import stream as stream_module

    write_shards(tmp_path, [8, 8])
    url = f"pipe:cat {tmp_path}/gone-{{000000..000001}}.tar"  # the command fails: there are no such files
    shards = resolve_shards(url, allow_pipe=True, info=str(tmp_path))
    reads = []
    monkeypatch.setattr(stream_module, "read_samples", lambda url, **kw: reads.append(url) or read_samples(url, **kw))
    # It gives up after three failed reads, not after an epoch's worth of lost samples: each can take curl a minute
    with pytest.raises(ShardError, match=r"^3 remote shard reads in a row gave no sample, the last from pipe:cat "
                                         r".*gone-00000[01].tar, which broke \(its command exited with status 1\); "
                                         r"read the URLs yourself to see why they fail \(run a pipe: URL's command "
                                         r"in a shell\)$"):
        consume(stream_for(shards))
    assert len(reads) == 3
    monkeypatch.undo()
    (tmp_path / "train-000000.tar").rename(tmp_path / "gone-000000.tar")  # one of the two commands works now
    with pytest.warns(UserWarning, match=r"pipe:cat .*gone-000001.tar broke \(its command exited with status 1\); "
                                         r"its samples after the break are skipped and counted"):
        assert sum(batch["skipped"] for batch in consume(stream_for(shards))) >= 8  # warned with the batch
    (tmp_path / "gone-000000.tar").rename(tmp_path / "train-000000.tar")
    with pytest.warns(UserWarning, match=r"gone-00000[01].tar broke"):  # evaluation reads warn too, of both
        with pytest.raises(ShardError, match=r"no readable image in 2 shards from pipe:cat .*gone-000000.tar on"):
            first_images(shards, 4, 16)


def test_a_pipe_command_that_ends_a_shard_early_but_cleanly_is_warned_about(tmp_path):
    write_shards(tmp_path, [8, 8])
    with tarfile.open(tmp_path / "train-000000.tar") as full, tarfile.open(tmp_path / "short.tar", "w") as short:
        for member in full.getmembers()[:12]:  # the first 4 samples of 8, as a complete tar: the command exits 0
            short.addfile(member, full.extractfile(member))
    shards = resolve_shards(f"pipe:cat {tmp_path}/{{short,train-000001}}.tar", allow_pipe=True, info=str(tmp_path))
    with pytest.warns(UserWarning, match=r"pipe:cat .*short.tar broke \(it ended after 4 of its 8 samples\); its "
                                         r"samples after the break are skipped and counted"):
        assert sum(batch["skipped"] for batch in consume(stream_for(shards))) >= 4


def test_a_shard_that_ends_early_says_how_many_samples_it_held_even_when_read_from_past_its_end(tmp_path):
    write_shards(tmp_path, [8])  # recorded below as 20 samples
    url = str(tmp_path / "train-000000.tar")
    reasons = []
    assert len(list(read_samples(url, 3, reasons.append, expected=20))) == 5
    assert list(read_samples(url, 10, reasons.append, expected=20)) == []  # the 8 samples before 10 were never read
    assert reasons == ["it ended after 8 of its 20 samples", "it ended after at most 10 of its 20 samples"]


def test_missing_shard_and_empty_split_fail_clearly(tmp_path):
    write_shards(tmp_path, [4, 4])
    (tmp_path / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match=f"'{tmp_path}' lists 1 missing shard, e.g. {tmp_path}/train-000001.tar"):
        resolve_shards(str(tmp_path))
    with pytest.raises(ShardError, match=r"wildcards are not expanded: write train-\{000000..000009\}.tar"):
        resolve_shards(f"{tmp_path}/train-*.tar")
    with pytest.raises(ShardError, match=rf"_info.json is a file but not a .tar shard: give the shard directory made "
                                         rf"by tools/make_shards.py \({tmp_path} holds _info.json\), or a brace"):
        resolve_shards(f"{tmp_path}/_info.json")
    with pytest.raises(ShardError, match="no split 'val'"):
        resolve_shards(str(tmp_path), split="val")
    update_split(tmp_path, "empty", [], [])
    with pytest.raises(ShardError, match="no shards found"):
        resolve_shards(str(tmp_path), split="empty")


def test_info_that_disagrees_with_shards_fails(tmp_path):
    write_shards(tmp_path, [4, 4])
    with tarfile.open(tmp_path / "train-000000.tar", "w"):
        pass  # now empty, while _info.json still says 4
    with pytest.raises(ShardError, match="holds 0 samples but _info.json says 4"):
        resolve_shards(str(tmp_path))


def test_only_shards_whose_size_is_not_the_recorded_one_have_their_headers_read(tmp_path, monkeypatch):
    write_shards(tmp_path, [4, 4, 4])
    names = [f"train-00000{i}.tar" for i in range(3)]
    update_split(tmp_path, "train", names, [4, 4, 4], shard_bytes=[(tmp_path / n).stat().st_size for n in names])
    scanned = []
    monkeypatch.setattr(shards_module, "count_tar_samples", lambda url: scanned.append(os.path.basename(url)) or
                        count_tar_samples(url))
    assert [shard.num_samples for shard in resolve_shards(str(tmp_path))] == [4, 4, 4] and scanned == []

    victim = tmp_path / names[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"train-000001.tar: .*truncated"):
        resolve_shards(str(tmp_path))
    assert scanned == [names[1]]

    scanned.clear()
    update_split(tmp_path, "train", names, [4, 4, 4])  # as make_shards wrote it before it recorded sizes
    with pytest.warns(UserWarning, match=r"train-000001.tar: "):
        resolve_shards(str(tmp_path))
    assert scanned == names


LISTS = "'filenames' and 'shard_lengths' must be lists of equal length, of file names and of sample counts"


@pytest.mark.parametrize("field, value, message", [
    ("shard_bytes", [1000], "'shard_bytes' must be a list with one size in bytes per file name"),
    ("shard_bytes", ["1000", "1000"], "'shard_bytes' must be a list with one size in bytes per file name"),
    ("shard_lengths", ["4", "4"], LISTS),  # summed, they gave a TypeError traceback
    ("filenames", [5, 6], LISTS),
])
def test_an_info_file_with_fields_of_the_wrong_type_is_refused_naming_them(tmp_path, field, value, message):
    write_shards(tmp_path, [4, 4])
    info = load_info(tmp_path)
    info["splits"]["train"][field] = value
    (tmp_path / "_info.json").write_text(json.dumps(info))
    with pytest.raises(InfoError, match=re.escape(f"split 'train': {message}")):
        resolve_shards(str(tmp_path))


def test_an_info_file_without_splits_says_how_to_make_one(tmp_path):
    write_shards(tmp_path, [4])
    (tmp_path / "_info.json").write_text(json.dumps({**load_info(tmp_path), "splits": {}}))
    with pytest.raises(ShardError, match=re.escape(f"{tmp_path}/_info.json lists no split; make the shards with "
                                                   "tools/make_shards.py --split train")):
        resolve_shards(str(tmp_path))


def test_a_gzip_shard_damaged_inside_a_sample_breaks_like_a_truncated_one(tmp_path):
    """zlib's error escapes tarfile when a member's bytes are read directly: training and inspect_shards crashed."""
    write_shards(tmp_path, [8, 8])
    victim = tmp_path / "train-000000.tar"
    with tarfile.open(victim) as tar:
        cut = tar.getmembers()[9].offset_data + 10  # inside the first member of sample 3 (3 members a sample)
    gzip_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    bad_block = bytes([1]) + (16).to_bytes(2, "little") + bytes(2) + bytes(16)  # a stored block whose NLEN is wrong
    victim.write_bytes(gzip.compress(victim.read_bytes()[:cut]) + gzip_header + bad_block)  # read as .tar.gz

    breaks = []
    assert len(list(read_samples(str(victim), on_break=breaks.append))) == 3
    assert breaks == ["Error -3 while decompressing data: invalid stored block lengths"]
    with pytest.warns(UserWarning, match="train-000000.tar: not a readable tar"):
        shards = resolve_shards(str(tmp_path))
    stream = stream_for(shards, batch=4)
    assert len(consume(stream)) == 4 and stream.state.skipped >= 5
    assert inspect_shards(tmp_path).problems


def test_file_urls_colons_in_local_paths_and_unbalanced_braces(tmp_path, monkeypatch):
    write_shards(tmp_path / "snap:v2", [4, 4])
    monkeypatch.chdir(tmp_path)
    local = resolve_shards("snap:v2")  # a relative directory whose name holds a colon, not a URL scheme
    assert [len(list(read_samples(shard.url))) for shard in local] == [4, 4]
    for spec in (f"file:{tmp_path}/snap:v2/train-000000.tar", f"file:{tmp_path}/snap:v2/train-{{000000..000001}}.tar",
                 f"file:{tmp_path}/snap:v2"):
        shards = resolve_shards(spec)
        assert [len(list(read_samples(shard.url))) for shard in shards] == [shard.num_samples for shard in shards]
    with pytest.raises(ShardError, match=r"has unbalanced braces .*; write a range as train-\{000000..000009\}.tar"):
        resolve_shards("snap:v2/train-{000000..000001.tar")


def test_too_few_samples_for_the_workers_fails_with_advice(tmp_path):
    write_shards(tmp_path, [3])
    with pytest.raises(ShardError, match="lower data.batch_size or data.num_workers"):  # one error line in the CLIs
        stream_for(resolve_shards(str(tmp_path)), workers=2, batch=4)


def test_decompression_bomb_cap_is_configurable_and_stays_on(tmp_path):
    from mae_tnt.data.images import set_max_image_pixels

    write_shards(tmp_path, [8], size=16)  # 256-pixel images
    shards = resolve_shards(str(tmp_path))
    try:
        set_max_image_pixels(300)
        assert len(consume(stream_for(shards, batch=4))) == 2
        set_max_image_pixels(100)  # every image is now over the cap: skipped, then a clear error
        with pytest.raises(RuntimeError, match="data.max_image_pixels"):
            consume(stream_for(shards, batch=4))
        with pytest.raises(ValueError, match="stays on"):
            set_max_image_pixels(None)
    finally:
        set_max_image_pixels(178_956_970)


def test_truncated_jpeg_inside_a_shard_is_skipped(tmp_path):
    import io
    import tarfile as tf

    import numpy as np
    from PIL import Image

    write_shards(tmp_path, [8, 7])  # + the broken JPEG = 16 samples: all of them are in the epoch
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    broken = buffer.getvalue()[:600]
    with tf.open(tmp_path / "train-000000.tar", "a") as tar:  # a 9th sample with a cut-off JPEG
        info = tf.TarInfo("s999999.jpg")
        info.size = len(broken)
        tar.addfile(info, io.BytesIO(broken))
    update_split(tmp_path, "train", ["train-000000.tar", "train-000001.tar"], [9, 7], [str(i) for i in range(10)])
    stream = stream_for(resolve_shards(str(tmp_path)), batch=4)
    # Its shard was not written by make_shards: no .json says which file the sample was made from
    with pytest.warns(UserWarning, match=r"skipped sample \S+/train-000000\.tar:s999999: OSError: Truncated Fil"):
        seen = keys(consume(stream))
    assert stream.state.skipped == 1 and len(seen) == 16
    assert "s999999" not in seen and len(set(seen)) == 15  # the refill borrows one sample from the next range


def test_members_outside_samples_are_skipped_alike_when_counting_and_reading(tmp_path):
    """A member without an extension is no sample: counts (used to seek on resume) and reads must agree."""
    path = tmp_path / "train-000000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.cls", b"0"), ("README", b"notes"), ("b.cls", b"1"), ("c.cls", b"2")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert count_tar_samples(path) == 3
    assert [s["__key__"] for s in read_samples(str(path))] == ["a", "b", "c"]
    assert [s["cls"] for s in read_samples(str(path), start=1)] == [b"1", b"2"]


@pytest.mark.parametrize("size", [32, 224])  # 32: floor(32 / 0.875) = 36 px, not 36.57
@pytest.mark.parametrize("portrait", [False, True])
def test_evaluation_images_are_timms_evaluation_transform(size, portrait):
    import numpy as np
    from PIL import Image
    from timm.data import create_transform

    shape = (size * 3 // 2, size * 5 // 4) if portrait else (size * 5 // 4, size * 3 // 2)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]  # [H, W]: stripes, which show any sub-pixel shift
    image = Image.fromarray(np.stack([xx * 64 % 256, yy * 64 % 256, (xx + yy) * 32 % 256], axis=-1).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    timm_eval = create_transform(size, crop_pct=0.875, interpolation="bicubic", is_training=False)
    expected = torch.from_numpy(np.array(timm_eval.transforms[1](timm_eval.transforms[0](image)))).permute(2, 0, 1)
    ours = eval_resize(buffer.getvalue(), size)  # uint8 [3, S, S]; timm's Resize + CenterCrop, before ToTensor
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_loader_workers_survive_a_stop_signal_that_reaches_them_as_they_start(even, monkeypatch, signum):
    """A scheduler's SIGTERM, or a Ctrl-C, to the process group can land between a worker's start and its
    worker_init_fn; the main process ends its workers itself."""
    started = []
    start = BaseProcess.start

    def start_then_terminate(process):
        start(process)
        started.append(process.pid)
        os.kill(process.pid, signum)

    monkeypatch.setattr(BaseProcess, "start", start_then_terminate)
    batches = consume(stream_for(even, workers=2))
    assert len(started) == 2 and sorted(keys(batches)) == sorted(keys(consume(stream_for(even))))


@pytest.mark.parametrize("compress", [False, True], ids=["tar", "tar.gz"])
def test_a_member_header_claiming_a_terabyte_is_a_break_not_an_allocation(tmp_path, compress):
    """A damaged header: the bytes it claims are checked against the file (plain tar) or the pixel limit."""
    write_shards(tmp_path, [2])
    intact = (tmp_path / "train-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        last = tar.getmembers()[-1]  # the second sample's json
    claim = tarfile.TarInfo(last.name)
    claim.size = 2**40
    damaged = intact[:last.offset] + claim.tobuf(tarfile.GNU_FORMAT) + bytes(4096)
    shard = tmp_path / ("damaged.tar.gz" if compress else "damaged.tar")
    shard.write_bytes(gzip.compress(damaged) if compress else damaged)
    breaks = []
    samples = list(read_samples(str(shard), on_break=breaks.append))
    assert [sample["__key__"] for sample in samples] == ["s000000"]
    assert breaks == [f"member {last.name} claims {2**40} bytes, more than any image within the pixel limit "
                      "(data.max_image_pixels) takes" if compress else "unexpected end of data"]


@pytest.mark.parametrize(("name", "fits"), [("a.tar", False), ("a.tar.gz", True), ("a.tgz", True)])
def test_a_compressed_shard_may_hold_more_samples_than_512_bytes_each(tmp_path, name, fits):
    """400 tiny images gzip to 12903 bytes, about 32 per sample (make_shards --compress)."""
    entry = {"num_samples": 400, "filenames": [name], "shard_lengths": [400], "shard_bytes": [12903]}
    (tmp_path / "_info.json").write_text(json.dumps({"splits": {"train": entry}}))
    if fits:
        assert load_info(tmp_path)["splits"]["train"]["num_samples"] == 400
    else:
        with pytest.raises(InfoError, match="more than a tar of that size can"):
            load_info(tmp_path)


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar writes the sparse member")
def test_a_sparse_member_of_a_plain_tar_reads_whole(tmp_path):
    """It stores less than its size: the check against the bytes left in the file must not take it for a cut."""
    member = tmp_path / "s000000.bin"
    with open(member, "wb") as file:
        file.write(b"head")
        file.seek(3 * 2**20)  # a hole of 3 MiB
        file.write(b"tail")
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", "shard.tar", member.name], cwd=tmp_path, check=True)
    assert (tmp_path / "shard.tar").stat().st_size < 2**20
    breaks = []
    samples = list(read_samples(str(tmp_path / "shard.tar"), on_break=breaks.append))
    assert breaks == [] and [len(sample["bin"]) for sample in samples] == [member.stat().st_size]
    assert samples[0]["bin"].startswith(b"head") and samples[0]["bin"].endswith(b"tail")


def test_an_info_file_counting_more_samples_than_a_shard_of_its_size_holds_is_refused(tmp_path):
    """Trusted by its recorded size, such a count had training count lost samples one by one, for ever."""
    write_shards(tmp_path, [3])
    info = json.loads((tmp_path / "_info.json").read_text())
    info["splits"]["train"]["shard_bytes"] = [(tmp_path / "train-000000.tar").stat().st_size]
    info["splits"]["train"]["shard_lengths"], info["splits"]["train"]["num_samples"] = [10**12], 10**12
    (tmp_path / "_info.json").write_text(json.dumps(info))
    with pytest.raises(InfoError, match=r"shard train-000000.tar is said to hold 1000000000000 samples in \d+ "
                                        r"bytes, more than a tar of that size can; regenerate it"):
        resolve_shards(str(tmp_path))


# a synset id; int() takes the next two, and refuses the last with a ValueError of its own
@pytest.mark.parametrize("label", [b"n01440764", b"-1", b"+3", b"1" * 5000], ids=["synset", "-1", "+3", "5000 digits"])
def test_a_label_that_is_not_a_class_index_skips_its_sample_in_training_evaluation_and_inspection(tmp_path, label,
                                                                                                  capsys):
    write_shards(tmp_path, [8, 8])
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:  # the same shard with a synset id where the class index belongs
        for member, data in members:
            data = label if member.name == "s000002.cls" else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    shards = resolve_shards(str(tmp_path))
    stream = stream_for(shards, batch=4)
    batches = consume(stream)
    assert "s000002" not in keys(batches) and stream.state.skipped >= 1
    named = [skip for batch in batches for skip in batch["skips"]]
    problem = f"its .cls {label[:40]!r} is not a class index (tools/make_shards.py writes those)"
    assert named == [f"{shard}:s000002 (made from img/2.png): {problem}"]
    with pytest.warns(UserWarning, match=r"evaluation left out 1 unreadable sample: \S+/train-000000\.tar:s000002 "
                                         rf"\(made from img/2\.png\): {re.escape(problem)}"):
        labels = torch.cat([labels for _, labels in eval_batches(shards, img_size=16, batch_size=4)])
    assert (labels >= 0).sum() == 15  # evaluation leaves it out too
    assert inspect_main([str(tmp_path)]) == 1
    assert f"{shard}:s000002 (made from img/2.png): {problem}" in capsys.readouterr().err


@pytest.mark.parametrize("info, problem", [
    ({"splits": []}, "expected an object with a 'splits' object"),
    ({"splits": {}, "classes": "cat,dog"}, "'classes' must be a list of names"),
])
def test_an_info_file_of_another_layout_is_refused_saying_how_to_remake_it(tmp_path, info, problem):
    (tmp_path / "_info.json").write_text(json.dumps(info))
    with pytest.raises(InfoError, match=f"_info.json: {problem}; regenerate it with tools/make_shards.py"):
        load_info(tmp_path)
