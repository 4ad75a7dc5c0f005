"""ImageFolder loading: bad files are skipped and counted, limits hold, augmentation is keyed."""
from __future__ import annotations

import os
import struct
import zlib

import pytest
import torch

from pyowt.train.errors import UserError
from pyowt.train.imagefolder import ImageFolderData, check_image, scan_image_folder

from ._helpers import make_folder, run_config, small_config, write_png


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_bomb_header(path: str, side: int = 100_000) -> None:
    """A 60-byte PNG that claims side x side pixels: only its header may ever be read."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
                + _png_chunk(b"IEND", b""))


def _bad_folder(root: str) -> str:
    make_folder(root, per_class=6)
    with open(os.path.join(root, "cat", "noise.png"), "wb") as f:  # not an image at all
        f.write(os.urandom(300))
    write_png(os.path.join(root, "dog", "whole.png"), (20, 20), seed=7)
    with open(os.path.join(root, "dog", "whole.png"), "rb") as f:
        data = f.read()
    with open(os.path.join(root, "dog", "truncated.png"), "wb") as f:  # valid header, data cut short
        f.write(data[: len(data) // 2])
    os.remove(os.path.join(root, "dog", "whole.png"))
    write_png(os.path.join(root, "cat", "wide.png"), (200, 100), seed=8)  # over the pixel limit below
    write_bomb_header(os.path.join(root, "dog", "bomb.png"))
    with open(os.path.join(root, "cat", "notes.txt"), "w") as f:  # not an image extension: ignored
        f.write("hello")
    return root


def test_scan_skips_and_counts_corrupt_and_oversized(tmp_path):
    root = _bad_folder(str(tmp_path / "imgs"))
    report = scan_image_folder(root, max_pixels=64 * 64)
    assert report.classes == ["cat", "dog"]
    assert len(report.samples) == 12
    kinds = {os.path.basename(p): k for p, k, _ in report.skipped}
    assert kinds == {"noise.png": "corrupt", "truncated.png": "corrupt", "wide.png": "oversized",
                     "bomb.png": "oversized"}
    assert report.count("corrupt") == 2 and report.count("oversized") == 2
    assert "skipped 2 corrupt and 2 oversized" in report.summary()


def test_limits_reject_before_decoding(tmp_path):
    bomb = str(tmp_path / "bomb.png")
    write_bomb_header(bomb)
    kind, reason = check_image(bomb)  # default limits: 10^10 pixels claimed, never decoded
    assert kind == "oversized" and "10000000000 pixels" in reason
    big = str(tmp_path / "big.png")
    write_png(big, (64, 64))
    assert check_image(big, max_file_bytes=1000)[0] == "oversized"
    assert check_image(big) is None


def test_scan_shards_agree(tmp_path):
    root = _bad_folder(str(tmp_path / "imgs"))
    # Two "ranks" checking half the files each, combined, give the single-process answer.
    halves = {}

    def exchange_for(rank):
        def exchange(mine):
            halves[rank] = mine
            other = 1 - rank
            if other not in halves:  # the other rank's share, computed the same way
                from pyowt.train.imagefolder import list_tree
                _, files = list_tree(root)
                flat = [p for ps in files for p in ps]
                halves[other] = [(i, v) for i in range(other, len(flat), 2)
                                 if (v := check_image(flat[i], max_pixels=64 * 64)) is not None]
            return [halves[0], halves[1]]
        return exchange

    r0 = scan_image_folder(root, max_pixels=64 * 64, shard=(0, 2), exchange=exchange_for(0))
    whole = scan_image_folder(root, max_pixels=64 * 64)
    assert r0.samples == whole.samples and r0.skipped == whole.skipped


def test_bad_layouts_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        scan_image_folder(str(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    write_png(str(tmp_path / "flat" / "a.png"))
    with pytest.raises(UserError, match="has no class folders"):
        scan_image_folder(str(tmp_path / "flat"))
    root = make_folder(str(tmp_path / "imgs"), per_class=2)
    os.makedirs(os.path.join(root, "empty"))
    with pytest.raises(UserError, match=r"class folder .*empty.* has no image files"):
        scan_image_folder(root)
    os.rmdir(os.path.join(root, "empty"))
    for f in os.listdir(os.path.join(root, "dog")):
        with open(os.path.join(root, "dog", f), "wb") as fh:
            fh.write(b"garbage")
    with pytest.raises(UserError, match="class 'dog' has no usable image"):
        scan_image_folder(root)


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    root = make_folder(str(tmp_path / "imgs"), per_class=3, size=(40, 30))
    data = ImageFolderData(scan_image_folder(root).samples, size=16, augment=True, seed=1)
    x, ok = data[(2, 5)]
    assert ok and x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x, data[(2, 5)][0])
    assert any(not torch.equal(data[(i, 0)][0], data[(i, 1)][0]) for i in range(len(data)))
    val = ImageFolderData(scan_image_folder(root).samples, size=16, augment=False)
    assert torch.equal(val[(0, 0)][0], val[(0, 9)][0])
    os.remove(data.paths[0])  # vanished after the scan: a blank image, flagged, not a crash
    blank, ok = data[(0, 0)]
    assert not ok and torch.count_nonzero(blank) == 0


def test_training_on_a_folder_with_bad_files(run_workers, tmp_path):
    root = _bad_folder(str(tmp_path / "imgs"))
    # (The pool's ranks are daemon processes, which cannot start DataLoader workers; the
    # test below covers those.)
    cfg = small_config(data=root, image_size=16, batch_size=4, epochs=1, val_fraction=0.25, loader_workers=0,
                       max_image_pixels=64 * 64)
    res = run_workers(2, run_config, cfg)[0]
    assert res["images"]["skipped_corrupt"] == 2 and res["images"]["skipped_oversized"] == 2
    assert res["images"]["failed_at_load"] == 0
    assert res["meta"]["train_size"] == 9 and res["meta"]["val_size"] == 3
    assert res["meta"]["classes"] == ["cat", "dog"]
    assert len(res["history"]["loss"]) == 9 // 4
    assert res["history"]["epochs"][0]["val_samples"] == 3


class _FakeParallelModel:
    """What the data source asks of a parallel model: rank r of k, batch-sharded input."""

    def __init__(self, rank, k, label_layout):
        from pyowt.parallel.layout import Layout

        self.rank, self.k, self.input_layout, self.label_layout = rank, k, Layout.SHARD_BATCH, label_layout

    def batch_slice(self, b):
        from pyowt.parallel.layers import shard_range

        return slice(*shard_range(b, self.k, self.rank))

    def label_slice(self, b):
        from pyowt.parallel.layout import Layout

        return self.batch_slice(b) if self.label_layout == Layout.SHARD_BATCH else slice(0, b)


def test_loader_workers_feed_each_rank_its_rows(tmp_path):
    from pyowt.parallel.layout import Layout
    from pyowt.parallel.sampler import epoch_batches
    from pyowt.train.data import open_data

    root = make_folder(str(tmp_path / "imgs"), per_class=7, size=(24, 24))
    src = open_data(root, 16, 0.25, seed=2, device=torch.device("cpu"), loader_workers=2)
    try:
        for rank, layout in ((0, Layout.REPLICATE), (1, Layout.SHARD_BATCH)):
            fake = _FakeParallelModel(rank, 2, layout)
            got = list(src.train_batches(fake, 5, epoch=1, start=1, seed=2))
            expected = list(epoch_batches(src.train_size, 5, 1, 2))[1:]
            assert len(got) == len(expected) == 1
            for (x, y, b, bad), idx in zip(got, expected):
                rows = idx[fake.batch_slice(5)]
                assert b == 5 and bad == 0 and x.shape == (len(rows), 3, 16, 16)
                for j, i in enumerate(rows.tolist()):
                    assert torch.equal(x[j], src.train_data[(i, 1)][0])
                want = idx if layout == Layout.REPLICATE else rows
                assert torch.equal(y, src.train_data.targets[want])
        val = list(src.val_batches(_FakeParallelModel(0, 2, Layout.REPLICATE), 100))
        assert sum(b for _, _, b, _ in val) == src.val_size == 4
    finally:
        src.close()
