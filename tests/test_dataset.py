"""dataset.py on tiny generated data: folders, captions.jsonl, videos, tar shards, MNIST, buckets, corrupt files."""
import io
import json
import multiprocessing
import os
import random
import signal
import tarfile

import imageio
import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from utils.config import load_config
from utils.errors import UserError, first_line
from utils.image import aspect_ratio_to_image_size
from utils.training import leave_stop_signals, start_workers


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def make_image_folder(root, n=6, sizes=((40, 40),), corrupt=0, jsonl=False):
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        _image(w, h, i).save(root / f"img{i}.png")
        if jsonl:
            lines.append(json.dumps({"file": f"img{i}.png", "caption": f"picture {i}"}))
        else:
            (root / f"img{i}.txt").write_text(f"picture {i}\n")
    for j in range(corrupt):
        (root / f"bad{j}.png").write_bytes(b"\x89PNG not really an image")
        (root / f"bad{j}.txt").write_text("broken")
    if jsonl:
        (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def make_video_folder(root, n=2, frames=12, fps=8, size=(24, 32)):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        video = np.zeros((frames, size[0], size[1], 3), np.uint8)
        video[:, :, :, 0] = np.arange(frames)[:, None, None] * 20  # red encodes the frame index
        imageio.mimwrite(root / f"clip{i}.mp4", video, fps=fps, codec="libx264", macro_block_size=1, quality=10)
        (root / f"clip{i}.txt").write_text(f"clip {i}")
    return root


def make_shards(root, n_shards=2, per_shard=4, corrupt=False):
    root.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in range(n_shards):
        with tarfile.open(root / f"data-{s:03d}.tar", "w") as tar:
            for _ in range(per_shard):
                buf = io.BytesIO()
                _image(36, 36, k).save(buf, format="PNG")
                payload = b"garbage" if corrupt and k == 1 else buf.getvalue()
                caption = json.dumps({"caption": f"shard image {k}"}).encode() if k % 2 else f"shard image {k}".encode()
                for name, data in ((f"{k:05d}.png", payload), (f"{k:05d}.{'json' if k % 2 else 'txt'}", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                k += 1
    return root


def cfg_for(data, **kw):
    """A config reading `data` (None: the built-in data_format in kw reads no path), of a text-conditional model
    (txt_size 8: files need captions) unless kw says txt_size=0."""
    values = dict(img_size=16, batch_size=2, num_workers=0, no_flip=1, txt_size=8,
                  **({} if data is None else {"data": str(data)}))
    values.update(kw)
    return load_config(None, values)


def all_batches(td, epoch=0, start=0):
    return list(td.epoch(epoch, start))


@pytest.mark.parametrize("jsonl", [False, True])
def test_image_folder(tmp_path, jsonl):
    root = make_image_folder(tmp_path / "imgs", n=5, sizes=((40, 30),), jsonl=jsonl)
    td = dataset.TrainData(cfg_for(root), rank=0, world_size=1, seed=0, multiple=8)
    batches = all_batches(td)
    assert td.format == "folder" and td.steps_per_epoch == 2 and len(batches) == 2
    x, captions, meta = batches[0]
    assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert all(c.startswith("picture ") for c in captions) and meta["skipped"] == []


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_skipped_and_named(tmp_path, workers):
    root = make_image_folder(tmp_path / "imgs", n=3, corrupt=1)
    td = dataset.TrainData(cfg_for(root, batch_size=4, num_workers=workers), rank=0, world_size=1, seed=0, multiple=8)
    (batch,) = all_batches(td)
    assert batch[0].shape[0] == 4
    assert batch[2]["skipped"] == [str(root / "bad0.png")]
    assert "broken" not in batch[1]


def test_global_batches_do_not_depend_on_world_size(tmp_path):
    root = make_image_folder(tmp_path / "imgs", n=8)
    cfg = cfg_for(root, batch_size=4, no_flip=0)
    one = all_batches(dataset.TrainData(cfg, 0, 1, seed=3, multiple=8), epoch=1)
    two = [all_batches(dataset.TrainData(cfg, r, 2, seed=3, multiple=8), epoch=1) for r in range(2)]
    for step, (x, caps, _) in enumerate(one):
        assert torch.equal(x, torch.cat([two[0][step][0], two[1][step][0]]))
        assert caps == two[0][step][1] + two[1][step][1]
    resumed = all_batches(dataset.TrainData(cfg, 0, 1, seed=3, multiple=8), epoch=1, start=1)
    assert torch.equal(resumed[0][0], one[1][0])
    other_epoch = all_batches(dataset.TrainData(cfg, 0, 1, seed=3, multiple=8), epoch=2)
    assert [b[1] for b in other_epoch] != [b[1] for b in one]
    capped = dataset.TrainData(cfg_for(root, batch_size=4, no_flip=0, epoch_length=5), 0, 1, seed=3, multiple=8)
    assert capped.steps_per_epoch == 1 and torch.equal(all_batches(capped, epoch=1)[0][0], one[0][0])


def test_aspect_buckets(tmp_path):
    root = make_image_folder(tmp_path / "imgs", n=8, sizes=((64, 36), (30, 45)))
    td = dataset.TrainData(cfg_for(root, mix_aspect=1, img_size=32), 0, 1, seed=0, multiple=8)
    shapes = {}
    for x, _, meta in all_batches(td):
        assert len(set(meta["aspect"])) == 1  # one bucket per batch
        shapes[meta["aspect"][0]] = tuple(x.shape[-2:])
    assert shapes == {"16:9": (24, 40), "2:3": (40, 24)}
    assert aspect_ratio_to_image_size(256, "16:9", 8) == (192, 344)
    assert aspect_ratio_to_image_size(640, "16:9", 16) == (480, 848)


def turned_photo(path, upright):
    """`upright` (a PIL image) stored as a camera does: turned a quarter, with EXIF orientation 6 to undo it."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)


def test_a_photo_with_exif_orientation_is_read_upright(tmp_path):
    """Training data and input images are read as a viewer shows them, in pixels and in the aspect bucket."""
    from utils.image import load_image, load_mask

    root = tmp_path / "imgs"
    root.mkdir()
    upright = _image(30, 45, 0)  # portrait
    upright.save(root / "plain.png")
    turned_photo(root / "photo.png", upright)
    for name in ("plain", "photo"):
        (root / f"{name}.txt").write_text("a photo")
    td = dataset.TrainData(cfg_for(root, mix_aspect=1, img_size=32), 0, 1, seed=0, multiple=8)
    (x, _, meta), = all_batches(td)
    assert meta["aspect"] == ["2:3", "2:3"] and torch.equal(x[0], x[1])
    assert torch.equal(load_image(root / "photo.png", (48, 32)), load_image(upright, (48, 32)))
    mask = np.zeros((45, 30), np.uint8)  # drawn on the picture as shown
    mask[20:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert load_mask(tmp_path / "mask.png", root / "photo.png", (48, 32))[30:].all()


def test_video_folder(tmp_path):
    root = make_video_folder(tmp_path / "vids", n=2, frames=12, fps=8)
    cfg = cfg_for(root, vid_size="5:4", batch_size=2)
    td = dataset.TrainData(cfg, 0, 1, seed=0, multiple=8)
    (x, captions, meta), = all_batches(td)
    assert td.format == "video" and x.shape == (2, 5, 3, 16, 16) and meta["fps"] == [4.0, 4.0]
    red = (x[0, :, 0].mean(dim=(-1, -2)) + 1) * 127.5
    steps = np.diff(red.numpy())
    assert np.allclose(steps, 40, atol=8)  # 8 fps source sampled at 4 fps: every 2nd frame


def test_an_evaluation_stops_at_a_damaged_video_with_one_line(tmp_path):
    root = make_video_folder(tmp_path / "vids", n=2, frames=12, fps=8)
    (root / "clip9.mp4").write_bytes(b"not a video")
    (root / "clip9.txt").write_text("clip 9")
    items = dataset.EvalItems(cfg_for(root, vid_size="5:4", batch_size=2), 8)
    with pytest.raises(UserError, match="clip9.mp4: .*; remove or replace the file") as error:
        list(items)
    assert "\n" not in str(error.value)  # not ffmpeg's whole log


def test_sample_clip_indices():
    r = random.Random(0)
    assert dataset.sample_clip_indices(5, 8, 9, 4, r) == np.linspace(0, 4, 9).round().astype(int).tolist()
    assert np.diff(dataset.sample_clip_indices(100, 30, 4, 10, r)).tolist() == [3, 3, 3]  # 30 fps -> 10 fps
    assert np.diff(dataset.sample_clip_indices(100, 10, 4, 30, r)).tolist() == [1, 1, 1]  # slower source: native rate


@pytest.mark.parametrize("corrupt", [False, True])
def test_webdataset_shards(tmp_path, corrupt):
    root = make_shards(tmp_path / "shards", corrupt=corrupt)
    cfg = cfg_for(str(root / "data-{000..001}.tar"), batch_size=2, epoch_length=6)
    td = dataset.TrainData(cfg, 0, 1, seed=0, multiple=8)
    batches = all_batches(td)
    assert td.format == "wds" and len(batches) == 3
    assert batches[0][0].shape == (2, 3, 16, 16)
    assert all(c.startswith("shard image") for b in batches for c in b[1])
    skipped = [s for b in batches for s in b[2]["skipped"]]
    assert len(skipped) == int(corrupt) and (not corrupt or "00001" in skipped[0])
    (root / "list.txt").write_text("\n".join(str(p) for p in sorted(root.glob("*.tar"))) + "\n")
    assert dataset.TrainData(cfg_for(root / "list.txt", batch_size=2, epoch_length=6), 0, 1, 0, 8).format == "wds"
    ranks = [all_batches(dataset.TrainData(cfg_for(str(root), batch_size=2, epoch_length=4), r, 2, 0, 8))
             for r in range(2)]
    seen = [set(c for b in batches for c in b[1]) for batches in ranks]
    assert not seen[0] & seen[1]  # ranks read different shards


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("shard", ["not a tar", "captions only"])
def test_shards_without_one_usable_sample_stop_with_one_line(tmp_path, shard, workers):
    """A stream of shards that yields nothing usable raises at the end of its first pass (it used to read them
    forever), with its workers ended so that the process can exit; a worker's error reads as its own line."""
    path = tmp_path / "data.tar"
    if shard == "not a tar":
        path.write_text("hi\n")
    else:
        with tarfile.open(path, "w") as tar:
            member = tarfile.TarInfo("a.txt")
            member.size = 2
            tar.addfile(member, io.BytesIO(b"hi"))
    td = dataset.TrainData(cfg_for(str(path), batch_size=2, epoch_length=4, num_workers=workers), 0, 1, 0, 8)
    with pytest.raises(UserError) as caught:
        all_batches(td)
    assert first_line(caught.value).startswith(f"no usable sample in 1 webdataset shard(s) ({path}, ...): ")
    assert not multiprocessing.active_children()


def test_mnist_and_colour_mnist():
    grey = dataset.MNISTDataset(16)
    x, caption, _ = grey.load(0, seed=0)
    assert x.shape == (3, 16, 16) and ("five" in caption or "5" in caption)
    assert torch.equal(x[0], x[1])
    held = {(5, "red"), (5, "green")}
    col = dataset.MNISTDataset(16, colour=True, holdout=held)
    captions = [col.load(0, seed=s)[1] for s in range(40)]
    words = {w.strip(",") for c in captions for w in c.split()}
    assert not words & {"red", "green"} and words & {"blue", "yellow", "purple", "white"}
    assert len({c for c in captions}) > 3  # templates and colours vary
    x, caption, _ = col.load(1, seed=0)
    assert not torch.equal(x[0], x[2]) or "white" in caption
    custom = dataset.MNISTDataset(16, caption_fn=lambda d, rng: f"digit {d}")
    assert custom.load(0, 0)[1] == "digit 5"
    assert dataset.parse_holdout("7:red, 2:blue") == {(7, "red"), (2, "blue")}
    with pytest.raises(UserError, match="holdout entry"):
        dataset.parse_holdout("7:teal")


def ink_centre(frame):
    """(y, x) centre of mass of a (H, W) frame's ink."""
    grid = torch.arange(frame.shape[0], dtype=torch.float32)
    return ((frame.sum(1) * grid).sum() / frame.sum()).item(), ((frame.sum(0) * grid).sum() / frame.sum()).item()


def test_moving_mnist_clips_move_as_captioned():
    data = dataset.MovingMNISTDataset(24, 6, 6.0)
    seen = set()
    for index in range(24):
        x, caption, meta = data.load(index, seed=3)
        assert x.shape == (6, 3, 24, 24) and x.min() == -1 and x.max() == 1
        assert torch.equal(x[:, 0], x[:, 2])
        direction = meta["key"].split(":")[1]
        digit = int(data.labels[index])
        assert direction in caption and (dataset.DIGIT_NAMES[digit] in caption.split() or str(digit) in caption)
        ink = (x[:, 0] + 1) / 2
        assert torch.allclose(ink.sum((1, 2)), ink[0].sum().expand(6))  # the whole digit stays on the canvas
        (y0, x0), (y1, x1) = ink_centre(ink[0]), ink_centre(ink[-1])
        dy, dx = dataset.DIRECTIONS[direction]
        assert (round(y1 - y0), round(x1 - x0)) == (10 * dy, 10 * dx)
        seen.add(direction)
    assert seen == set(dataset.DIRECTIONS)
    assert torch.equal(data.load(5, seed=3)[0], data.load(5, seed=3)[0])
    with pytest.raises(UserError, match="cannot cross"):
        dataset.MovingMNISTDataset(8, 9, 6.0)


def test_moving_mnist_train_data():
    cfg = cfg_for(None, data_format="moving_mnist", vid_size="6:6", img_size=24, batch_size=4, epoch_length=8)
    pixels, captions, meta = next(dataset.TrainData(cfg, 0, 1, 0, 4).epoch(0))
    assert pixels.shape == (4, 6, 3, 24, 24) and len(captions) == 4 and meta["fps"] == [6.0] * 4
    with pytest.raises(UserError, match="set vid_size"):
        dataset.TrainData(cfg_for(None, data_format="moving_mnist", epoch_length=8), 0, 1, 0, 4)


@pytest.mark.parametrize("data, message", [
    ("missing_dir", "data path not found"),
    ("missing-{000..001}.tar", "shards not found"),
    ("empty", "no captioned image"),
])
def test_bad_data_paths(tmp_path, data, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "lonely.png").write_bytes(b"")
    with pytest.raises(UserError, match=message):
        dataset.TrainData(cfg_for(tmp_path / data, epoch_length=8), 0, 1, 0, 8)


@pytest.mark.parametrize("kind", ["videos", "images"])
def test_a_folder_of_the_other_kind_of_data_says_so(tmp_path, kind):
    """Captioned videos given to an image config (and images to a video config) are not 'uncaptioned'."""
    if kind == "videos":
        root, cfg = make_video_folder(tmp_path / "data"), {}
        match = r"no image files in .*data, but 2 video file\(s\): this config reads images \(it has no vid_size\)"
    else:
        root, cfg = make_image_folder(tmp_path / "data", n=3), {"vid_size": "5:4"}
        match = r"no video \(.*\) files in .*data, but 3 image file\(s\): this config reads videos"
    with pytest.raises(UserError, match=match):
        dataset.TrainData(cfg_for(root, **cfg), 0, 1, 0, 8)
    (root / "extra.png" if kind == "videos" else root / "extra.mp4").write_bytes(b"")  # uncaptioned: the old hint
    with pytest.raises(UserError, match="put a .txt caption next to each file"):
        dataset.TrainData(cfg_for(root, **cfg), 0, 1, 0, 8)


def test_captions_saved_with_a_byte_order_mark_read_as_text(tmp_path):
    """Windows editors may put U+FEFF first in UTF-8 files: in a .txt caption, captions.jsonl or a shard."""
    bom = "\ufeff"
    for jsonl in (False, True):
        root = make_image_folder(tmp_path / f"imgs{int(jsonl)}", n=2, jsonl=jsonl)
        sidecar = root / ("captions.jsonl" if jsonl else "img0.txt")
        sidecar.write_text(bom + sidecar.read_text(), encoding="utf-8")
        (_, captions, _), = all_batches(dataset.TrainData(cfg_for(root), 0, 1, seed=0, multiple=8))
        assert sorted(captions) == ["picture 0", "picture 1"]
    with tarfile.open(tmp_path / "bom.tar", "w") as tar:
        for k in range(2):
            buf = io.BytesIO()
            _image(36, 36, k).save(buf, format="PNG")
            for ext, payload in (("png", buf.getvalue()), ("txt", (bom + f"picture {k}").encode())):
                info = tarfile.TarInfo(f"{k:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (_, captions, _), = all_batches(dataset.TrainData(cfg_for(tmp_path / "bom.tar", epoch_length=2), 0, 1, seed=0,
                                                      multiple=8))
    assert sorted(captions) == ["picture 0", "picture 1"]


def signal_then_leave_stop_signals(worker_id):
    os.kill(os.getpid(), signal.SIGTERM)  # a job-wide SIGTERM that arrives while the worker starts
    leave_stop_signals(worker_id)


def test_a_loader_worker_outlives_a_stop_signal_that_comes_while_it_starts():
    """Workers start with SIGINT/SIGTERM blocked, so they never die before the training process checkpoints (a
    dead worker ends the run: torch raises in the training process)."""
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2, num_workers=1,
                                         worker_init_fn=signal_then_leave_stop_signals)
    assert [batch.tolist() for batch in start_workers(loader)] == [[0, 1], [2, 3]]
    assert not signal.pthread_sigmask(signal.SIG_BLOCK, [])  # nothing left blocked here


def test_an_unconditional_model_reads_files_without_captions(tmp_path):
    """txt_size 0 (no text conditioning): a folder or shards of bare images train, each with the caption ''."""
    root = make_image_folder(tmp_path / "imgs", n=4)
    (root / "img0.txt").unlink()
    (root / "img1.txt").unlink()
    (_, captions, _), = all_batches(dataset.TrainData(cfg_for(root), 0, 1, seed=0, multiple=8))
    assert sorted(captions) == ["picture 2", "picture 3"]  # a text-conditional model leaves the bare files out
    (_, captions, _), = all_batches(dataset.TrainData(cfg_for(root, batch_size=4, txt_size=0), 0, 1, seed=0,
                                                      multiple=8))
    assert sorted(captions) == ["", "", "picture 2", "picture 3"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files in .*empty$"):  # not a word about captions
        dataset.TrainData(cfg_for(tmp_path / "empty", txt_size=0), 0, 1, seed=0, multiple=8)
    with tarfile.open(tmp_path / "bare.tar", "w") as tar:
        for k in range(2):
            buf = io.BytesIO()
            _image(36, 36, k).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{k:04d}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    shards = cfg_for(tmp_path / "bare.tar", epoch_length=2, txt_size=0)
    (x, captions, _), = all_batches(dataset.TrainData(shards, 0, 1, seed=0, multiple=8))
    assert captions == ["", ""] and x.shape == (2, 3, 16, 16)


def test_too_little_data(tmp_path):
    root = make_image_folder(tmp_path / "imgs", n=2)
    with pytest.raises(UserError, match="fewer than one global batch"):
        dataset.TrainData(cfg_for(root, batch_size=4), 0, 1, 0, 8)
