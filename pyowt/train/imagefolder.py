"""Images in the ImageFolder layout (``root/<class>/<image>``), loaded with safety limits.

Nothing is decoded without a bound: before an image is used, :func:`scan_image_folder`

1. rejects files larger than ``max_file_bytes`` (stat only, nothing read);
2. reads the header and rejects images of more than ``max_pixels`` pixels (a decompression
   bomb is a few KB of PNG that inflates to gigabytes: the header tells its size first);
3. runs PIL's ``verify()`` (structure and checksums), then decodes it for real (JPEGs at
   reduced scale through ``draft``) so that truncated data is caught too.

A file failing 1-2 is *oversized*, one failing 3 *corrupt*; both are skipped and counted,
never fatal. Bad layout is fatal, with a message: a missing folder, no class folders, a class
folder without image files, or no usable image at all.

Augmentation is deterministic: a sample's random crop and flip are drawn from a generator
keyed by (seed, epoch, sample index), so the data a step sees does not depend on the
DataLoader's workers or on how many ranks share the batch, and a resumed run sees exactly
what the interrupted one would have.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DEFAULT_MAX_PIXELS = 64 * 2**20          # 67M pixels: ~8k x 8k, far beyond any training image
DEFAULT_MAX_FILE_BYTES = 64 * 2**20      # 64 MiB per file
# ImageNet statistics: the usual normalization for RGB photographs.
RGB_MEAN, RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ScanReport:
    """What a scan kept and what it skipped, with the reason for each skipped file."""

    samples: List[Tuple[str, int]]
    classes: List[str]
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)  # (path, kind, reason)

    def count(self, kind: str) -> int:
        return sum(1 for _, k, _ in self.skipped if k == kind)

    def summary(self, limit: int = 5) -> str:
        if not self.skipped:
            return f"{len(self.samples)} images in {len(self.classes)} classes, none skipped"
        lines = [f"{len(self.samples)} images in {len(self.classes)} classes; skipped "
                 f"{self.count('corrupt')} corrupt and {self.count('oversized')} oversized:"]
        lines += [f"  {path}: {reason}" for path, _, reason in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        return "\n".join(lines)


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow comes with torchvision
        raise UserError("loading an image folder needs Pillow: pip install pillow") from e
    return Image


def list_image_folder(root: str) -> Tuple[List[str], List[List[str]]]:
    """(class names, image paths per class) of an ImageFolder tree; :class:`UserError` for a
    missing folder, no class folders, or a class folder without image files. A root with
    ``train/`` and ``val/`` folders is checked as two trees."""
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        list_tree(os.path.join(root, "val"))
        return list_tree(os.path.join(root, "train"))
    return list_tree(root)


def list_tree(root: str) -> Tuple[List[str], List[List[str]]]:
    if not os.path.isdir(root):
        raise UserError(f"--data: {root!r} is not a directory (expected an ImageFolder layout: "
                        "<root>/<class>/<image>.jpg, or 'digits' / 'synthetic')")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"--data: {root!r} has no class folders (expected <root>/<class>/<image>.jpg)")
    files = []
    for c in classes:
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, c)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise UserError(f"--data: class folder {os.path.join(root, c)!r} has no image files "
                            f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
        files.append(found)
    return classes, files


def check_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Optional[Tuple[str, str]]:
    """None if ``path`` is a usable image, else (``"oversized"`` | ``"corrupt"``, reason)."""
    Image = _pil()
    try:
        size = os.path.getsize(path)
    except OSError as e:
        return "corrupt", f"cannot stat: {e}"
    if size > max_file_bytes:
        return "oversized", f"file is {size} bytes, limit {max_file_bytes}"
    if size == 0:
        return "corrupt", "empty file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                w, h = im.size
                if w * h > max_pixels:
                    return "oversized", f"{w}x{h} = {w * h} pixels, limit {max_pixels}"
                im.verify()
            with Image.open(path) as im:  # verify() leaves the image unusable: reopen to decode
                im.draft("RGB", (256, 256))
                im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return "oversized", str(e)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        return "corrupt", f"{type(e).__name__}: {e}"
    return None


def scan_image_folder(root: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                      max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, shard: Tuple[int, int] = (0, 1),
                      exchange=None, threads: int = 4) -> ScanReport:
    """List and check ``root``'s images (see the module docstring).

    ``shard = (rank, K)``: this process checks files ``rank::K``; ``exchange(list) -> list of
    lists`` (an all-gather of Python objects) combines the K partial results, so every rank
    ends with the same report. Raises :class:`UserError` for a bad layout.
    """
    classes, files = list_tree(root)
    flat = [(p, label) for label, paths in enumerate(files) for p in paths]
    rank, k = shard
    mine = list(range(rank, len(flat), k))
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        verdicts = list(pool.map(lambda i: check_image(flat[i][0], max_pixels, max_file_bytes), mine))
    bad = [(i, v) for i, v in zip(mine, verdicts) if v is not None]
    if exchange is not None and k > 1:
        bad = [b for part in exchange(bad) for b in part]
    bad_by_index = dict(bad)
    samples = [s for i, s in enumerate(flat) if i not in bad_by_index]
    skipped = [(flat[i][0], kind, reason) for i, (kind, reason) in sorted(bad_by_index.items())]
    report = ScanReport(samples, classes, skipped)
    if not samples:
        raise UserError(f"--data: no usable images under {root!r}\n{report.summary()}")
    emptied = sorted(set(range(len(classes))) - {label for _, label in samples})
    if emptied:
        raise UserError(f"--data: class {classes[emptied[0]]!r} has no usable image after skipping bad files\n"
                        f"{report.summary()}")
    return report


class ImageFolderData(torch.utils.data.Dataset):
    """Decoded, resized, normalized images of a scanned folder.

    Indexed by ``(sample index, epoch)`` so that augmentation is a pure function of both;
    returns ``(image (C, S, S) float32, ok)`` where ``ok`` is False when the file could not
    be decoded after all (it changed since the scan): the image is then zeros (the mean
    after normalization) and the caller counts it.
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], size: int, channels: int = 3,
                 augment: bool = False, seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.paths = [p for p, _ in samples]
        self.targets = torch.tensor([t for _, t in samples], dtype=torch.int64)
        self.size, self.channels, self.augment, self.seed = size, channels, augment, seed
        self.max_pixels, self.max_file_bytes = max_pixels, max_file_bytes
        mean, std = (RGB_MEAN, RGB_STD) if channels == 3 else ((0.5,), (0.5,))
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, path: str):
        Image = _pil()
        # A second net behind the scan: PIL itself refuses anything beyond the limit.
        Image.MAX_IMAGE_PIXELS = self.max_pixels
        if os.path.getsize(path) > self.max_file_bytes:
            raise ValueError("file grew beyond the size limit since the scan")
        pre = int(round(self.size * 1.14))
        with Image.open(path) as im:
            im.draft("RGB" if self.channels == 3 else "L", (pre, pre))
            return im.convert("RGB" if self.channels == 3 else "L")

    def __getitem__(self, key):
        index, epoch = key
        try:
            im = self._decode(self.paths[index])
        except Exception:  # noqa: BLE001 - counted and reported by the caller, never fatal
            return torch.zeros(self.channels, self.size, self.size), False
        Image = _pil()
        s, pre = self.size, int(round(self.size * 1.14))
        w, h = im.size
        scale = pre / min(w, h)
        im = im.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.BILINEAR)
        w, h = im.size
        if self.augment:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            left = int(torch.randint(0, w - s + 1, (1,), generator=g))
            top = int(torch.randint(0, h - s + 1, (1,), generator=g))
            flip = bool(torch.rand((), generator=g) < 0.5)
        else:
            left, top, flip = (w - s) // 2, (h - s) // 2, False
        im = im.crop((left, top, left + s, top + s))
        if flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(im, dtype=np.uint8).reshape(s, s, self.channels)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std, True


def collate(items):
    """(images (N, C, S, S), number of samples that failed to decode)."""
    xs, oks = zip(*items)
    return torch.stack(xs), sum(1 for ok in oks if not ok)
