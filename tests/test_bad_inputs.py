"""Bad input, table by table for each entry point: exit status 2, one `error:` line naming the argument or file, no
traceback, nothing left under a final name, and nothing hangs (every row runs under a time limit). Then the Python
API (ValueError / TypeError naming the argument), a full disk while sampling and while checkpointing, output
names that never collide, and the conversions that used to give wrong results silently."""
import errno
import json
import os
import re
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import finetune_decoder
import sample
import train
from conftest import LIMIT_S, tiny_flags
from scripts import extract_image_from_video, extract_images
from utils import pipeline as pipeline_module
from utils import training as T
from utils.config import SCHEMA, Compat, load_config
from utils.errors import UserError, run_cli
from utils.files import write_json
from utils.image import load_image, make_grid, write_png
from utils.pipeline import ARGUMENTS, STARFlowPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("time_limit")  # every test here fails after LIMIT_S instead of hanging


@pytest.fixture
def bad(tmp_path):
    """Bad files of every kind, in their own folder (so outputs can be told apart from inputs)."""
    d = tmp_path / "inputs"
    d.mkdir()
    (d / "afile").write_text("x")
    (d / "latin1.txt").write_bytes("une caf\xe9 cr\xe8me\n".encode("latin-1"))
    (d / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (d / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" + bytes(range(256)))
    (d / "latin1.yaml").write_bytes("dataset: caf\xe9\n".encode("latin-1"))
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    (d / "empty.pth").write_bytes(b"")
    (d / "folder.txt").mkdir()
    (d / "list_value.yaml").write_text("vae: [a, b]\n")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'PWNED'}",))
    torch.save({"w": torch.zeros(2), "evil": Evil()}, d / "evil.pth")
    return d


def outputs(root, inputs):
    """Files under root that are not prepared inputs (temporary files included: none may be left)."""
    return sorted(os.path.relpath(os.path.join(dirpath, f), root) for dirpath, _, files in os.walk(root)
                  for f in files if not os.path.join(dirpath, f).startswith(str(inputs)))


def one_error(err, pattern):
    """The stderr of a failed run: one `error:` line, the last, matching `pattern`; no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


def expect_exit_2(call, capsys, pattern):
    with pytest.raises(SystemExit) as e:
        call()
    assert e.value.code == 2
    return one_error(capsys.readouterr().err, pattern)


# ------------------------------------------------------------------------------------------------- sample.py
# (case, model, flags, error pattern); model t2i or t2v; {bad} is the folder of bad files. Rows marked "early"
# must fail before the text encoder and the model load.
SAMPLE_ROWS = [
    ("jacobi_block_size_0", "t2i", "--jacobi 1 --jacobi_block_size 0", r"'jacobi_block_size' must be >= 1; got 0"),
    ("jacobi_max_iter_0", "t2i", "--jacobi 1 --jacobi_max_iter 0", r"'jacobi_max_iter' must be >= 1"),
    ("jacobi_th_negative", "t2i", "--jacobi_th -1", r"'jacobi_th' must be >= 0"),
    ("num_samples_0", "t2i", "--num_samples 0", r"'num_samples' must be >= 1; got 0"),
    ("num_samples_negative", "t2i", "--num_samples -3", r"'num_samples' must be >= 1"),
    ("num_samples_fraction", "t2i", "--num_samples 1.5", r"'num_samples' expects a whole number, got '1.5'"),
    ("sample_batch_size_0", "t2i", "--sample_batch_size 0", r"'sample_batch_size' must be >= 1"),
    ("seed_negative", "t2i", "--seed -1", r"'seed' must be between 0 and 2\^63-1; got -1"),
    ("attn_temp_0", "t2i", "--attn_temp 0", r"'attn_temp' must be > 0; got 0"),
    ("prior_temp_negative", "t2i", "--prior_temp -0.5", r"'prior_temp' must be >= 0; got -0.5"),
    ("cfg_negative", "t2i", "--cfg -1", r"'cfg' must be >= 0"),
    ("cfg_nan", "t2i", "--cfg nan", r"'cfg' expects finite numbers"),
    ("cfg_text", "t2i", "--cfg strong", r"'cfg' expects finite numbers, got 'strong'"),
    ("target_noise_std_negative", "t2i", "--target_noise_std -0.1", r"'target_noise_std' must be >= 0"),
    ("denoising_batch_size_0", "t2i", "--denoising_batch_size 0", r"'denoising_batch_size' must be >= 1"),
    ("dtype_unknown", "t2i", "--dtype float8", r"'dtype' must be one of auto, float32, bfloat16, float16"),
    ("jacobi_2", "t2i", "--jacobi 2", r"'jacobi' must be one of 0, 1, auto; got '2'"),
    ("save_latents_2", "t2i", "--save_latents 2", r"'save_latents' must be 0 or 1"),
    ("out_fps_0", "t2v", "--out_fps 0", r"'out_fps' must be > 0"),
    ("target_length_negative", "t2v", "--target_length -5", r"'target_length' must be >= 1; got -5"),
    ("target_length_0", "t2v", "--target_length 0", r"'target_length' must be >= 1; got 0"),
    ("context_length_0", "t2v", "--jacobi 1 --target_length 9 --context_length 0", r"'context_length' must be >= 1"),
    ("device_cuda_without_cuda", "t2i", "--device cuda", r"device 'cuda': this machine has no usable CUDA GPU"),
    ("device_unknown", "t2i", "--device tpu", r"'device' must be auto, cpu, cuda, cuda:N or mps; got 'tpu'"),
    ("aspect_text", "t2i", "--aspect_ratio wide", r"aspect ratio must look like 'W:H'"),
    ("aspect_extreme", "t2i", "--aspect_ratio 40:1", r"aspect ratio '40:1' is impossible"),
    ("input_image_missing", "t2v", "--input_image {bad}/nope.png", r"'input_image': '.*nope.png' does not exist"),
    ("input_image_folder", "t2v", "--input_image {bad}/folder.txt", r"'input_image': .* is a folder"),
    ("early:input_image_broken", "t2v", "--input_image {bad}/broken.png", r"cannot read input image .*broken.png"),
    ("early:input_image_for_t2i", "t2i", "--input_image {bad}/broken.png", r"needs a video model"),
    ("early:target_length_not_1_plus_4k", "t2v", "--target_length 7", r"1 \+ 4k frames, e.g. 5 or 9"),
    ("early:long_video_without_jacobi", "t2v", "--target_length 9 --jacobi 0", r"needs --jacobi 1"),
    ("early:input_image_for_one_frame", "t2v", "--target_length 1 --input_image {bad}/broken.png",
     r"input_image is the first frame of a video, and target_length 1 asks for that frame alone"),
    ("early:aspect_impossible_at_img_size", "t2i", "--img_size 8 --aspect_ratio 4:1", r"cannot be made at img_size 8"),
    ("early:context_too_long", "t2v", "--jacobi 1 --target_length 9 --context_length 5",
     r"context_length must be between 1 and 1 latent frames, got 5"),
    ("caption_latin1", "t2i", "--caption {bad}/latin1.txt", r"caption file .*latin1.txt' is not UTF-8 text"),
    ("caption_binary", "t2i", "--caption {bad}/binary.txt", r"caption file .*binary.txt' is not UTF-8 text"),
    ("caption_folder", "t2i", "--caption {bad}/folder.txt", r"caption file .*folder.txt' is a folder"),
    ("caption_a_path_not_txt", "t2i", "--caption {bad}/afile", r"--caption '.*afile' names a file or folder, not a"),
    ("config_binary", "t2i", "--model_config_path {bad}/binary.yaml", r"config file .*binary.yaml' is not UTF-8"),
    ("config_latin1", "t2i", "--model_config_path {bad}/latin1.yaml", r"config file .*latin1.yaml' is not UTF-8"),
    ("output_dir_under_a_file", "t2i", "--output_dir {bad}/afile/sub", r"'output_dir' .* '.*afile' is a file"),
    ("output_dir_is_a_file", "t2i", "--output_dir {bad}/afile", r"'output_dir' '.*afile' is a file, not a folder"),
    ("logdir_under_a_file", "t2i", "--logdir {bad}/afile/logs", r"'logdir' .* '.*afile' is a file"),
    ("checkpoint_malicious_pickle", "t2i", "--checkpoint_path {bad}/evil.pth",
     r"evil.pth' holds more than tensors: it pickles Python objects \(posix.system\), and loading it could run code"),
    ("checkpoint_empty", "t2i", "--checkpoint_path {bad}/empty.pth", r"cannot read checkpoint .*empty.pth"),
    ("misspelt_learning_rate", "t2i", "--learning_rate 1e-3", r"unknown config key 'learning_rate'; did you mean 'lr'"),
    ("misspelt_guidance", "t2i", "--guidance_scale 3", r"'guidance_scale'; did you mean 'cfg'"),
    ("stray_value", "t2i", "stray", r"--logdir takes one value, got .*logs stray"),
]


@pytest.mark.parametrize("case,model,flags,pattern", SAMPLE_ROWS, ids=[r[0] for r in SAMPLE_ROWS])
def test_sample_bad_input(tiny_t2i, tiny_t2v, bad, tmp_path, capsys, monkeypatch, case, model, flags, pattern):
    m = tiny_t2i if model == "t2i" else tiny_t2v
    given = shlex.split(flags.format(bad=bad))
    defaults = {"--model_config_path": m["config"], "--checkpoint_path": m["pth"], "--caption": "a cat",
                "--output_dir": str(tmp_path / "out"), "--logdir": str(tmp_path / "logs")}
    if "--logdir" in given:  # the default output folder lies under logdir
        del defaults["--output_dir"]
    argv = [t for flag, value in defaults.items() if flag not in given for t in (flag, value)]
    if case.startswith("early:"):  # the text encoder loads after the checks: it must never be reached
        monkeypatch.setattr(pipeline_module, "load_text_encoder",
                            lambda *a, **k: pytest.fail("the text encoder loaded before the flags were checked"))
    monkeypatch.setattr(sys, "argv", ["sample.py", *argv, *given])
    expect_exit_2(sample.cli, capsys, pattern)
    assert outputs(tmp_path, bad) == [] and not (bad / "PWNED").exists()


# -------------------------------------------------------------------------------------------------- train.py
TRAIN = tiny_flags(patch_size=4, layers_per_block=[1, 1]) + [
    "--vae", "none", "--channel_size", "3", "--img_size", "16", "--num_workers", "0", "--wandb", "0",
    "--data_format", "mnist", "--batch_size", "4", "--epochs", "1", "--epoch_length", "8"]
TRAIN_ROWS = [
    ("epochs_0", "--epochs 0", r"'epochs' must be >= 1; got 0"),
    ("lr_negative", "--lr -1", r"'lr' must be > 0; got -1"),
    ("lr_nan", "--lr nan", r"'lr' expects a finite number, got 'nan'"),
    ("min_lr_above_lr", "--lr 1e-3 --min_lr 1", r"'min_lr' \(1.0\) is above 'lr'"),
    ("acc_0", "--acc 0", r"'acc' must be >= 1"),
    ("batch_size_negative", "--batch_size -4", r"'batch_size' must be >= 1"),
    ("drop_label_above_1", "--drop_label 1.5", r"'drop_label' must be between 0 and 1; got 1.5"),
    ("noise_std_negative", "--noise_std -0.1", r"'noise_std' must be >= 0"),
    ("num_workers_negative", "--num_workers -1", r"'num_workers' must be >= 0"),
    ("ckpt_every_negative", "--ckpt_every -1", r"'ckpt_every' must be >= 0"),
    ("log_every_0", "--log_every 0", r"'log_every' must be >= 1"),
    ("rope_2", "--rope 2", r"'rope' must be 0 or 1"),
    ("img_size_none", "--img_size none", r"'img_size' needs a value \(>= 1\); got none"),
    ("layers_without_deep_block", "--layers_per_block 1 0", r"'layers_per_block' needs .* a deep \(last\) block"),
    ("vid_size_0_frames", "--vid_size 0:8", r"vid_size needs frames >= 1 and fps > 0, got '0:8'"),
    ("wandb_name_unknown_key", "--wandb_name a+nokey", r"'nokey' after '\+' is not a config key"),
    ("heads_do_not_split", "--channels 40", r"describes no valid model: channels 40 is not a multiple of head_dim 16"),
    ("img_size_not_a_multiple", "--img_size 18", r"img_size 18 must be a multiple of VAE factor x patch_size = 4"),
    ("device_cuda_without_cuda", "--device cuda", r"no usable CUDA GPU"),
    ("logdir_is_a_file", "--logdir {bad}/afile", r"'logdir' '.*afile' is a file, not a folder"),
    ("logdir_under_a_file", "--logdir {bad}/afile/logs", r"'logdir' .*'.*afile' is a file"),
    ("config_binary", "--model_config_path {bad}/binary.yaml", r"config file .*binary.yaml' is not UTF-8 text"),
    ("resume_malicious_pickle", "--resume_path {bad}/evil.pth", r"evil.pth' holds more than tensors"),
    ("resume_missing", "--resume_path {bad}/nope", r"'resume_path': '.*nope' does not exist"),
    ("misspelt_learning_rate", "--learning_rate 1e-3", r"unknown config key 'learning_rate'; did you mean 'lr'"),
    ("misspelt_steps", "--num_steps 5", r"'num_steps'; did you mean 'max_steps'"),
    ("holdout_without_colour_mnist", "--holdout 7:red", r"'holdout' applies to data_format colour_mnist only"),
    ("fsdp_text_encoder_without_fsdp", "--fsdp_text_encoder 1", r"'fsdp_text_encoder' 1 .* needs fsdp 1"),
    ("seed_too_large", f"--train_seed {2**64}", r"'train_seed' must be between 0 and 2\^63-1"),
    ("str_key_given_a_list", "--model_config_path {bad}/list_value.yaml",
     r"'vae' expects one text value, got \['a', 'b'\]"),
]


def run_training_row(main, base, flags, bad, tmp_path, capsys, pattern):
    """A train.py-like entry point with the row's flags (its --logdir, if any, replaces the default one)."""
    given = shlex.split(flags.format(bad=bad))
    logdir = [] if "--logdir" in given else ["--logdir", str(tmp_path / "logs")]
    expect_exit_2(lambda: main(base + logdir + given), capsys, pattern)
    assert outputs(tmp_path, bad) == [] and not (bad / "PWNED").exists()


@pytest.mark.parametrize("case,flags,pattern", TRAIN_ROWS, ids=[r[0] for r in TRAIN_ROWS])
def test_train_bad_input(tiny_t5_dir, bad, tmp_path, capsys, case, flags, pattern):
    run_training_row(train.main, TRAIN + ["--text", tiny_t5_dir], flags, bad, tmp_path, capsys, pattern)


# -------------------------------------------------------------------------------------------- finetune_decoder.py
FINETUNE_ROWS = [
    ("img_size_not_a_multiple", "--img_size 20", r"img_size 20 must be a multiple of the VAE's 8x spatial factor"),
    ("lpips_negative", "--lpips -1", r"'lpips' must be >= 0; got -1"),
    ("gan_weight_negative", "--gan_weight -0.5", r"'gan_weight' must be >= 0"),
    ("gan_start_negative", "--gan_start -1", r"'gan_start' must be >= 0"),
    ("eval_samples_0", "--eval_samples 0", r"'eval_samples' must be >= 1"),
    ("use_3d_disc_2", "--use_3d_disc 2", r"'use_3d_disc' must be 0 or 1"),
    ("noise_std_0", "--noise_std 0", r"needs noise_type gaussian and noise_std > 0"),
    ("lpips_weights_missing", "--lpips 1 --lpips_weights {bad}/nope", r"'lpips_weights': '.*nope' does not exist"),
    ("logdir_under_a_file", "--logdir {bad}/afile/logs", r"'logdir' .*'.*afile' is a file"),
    ("misspelt_learning_rate", "--learning_rate 1", r"did you mean 'lr'"),
]


@pytest.mark.parametrize("case,flags,pattern", FINETUNE_ROWS, ids=[r[0] for r in FINETUNE_ROWS])
def test_finetune_decoder_bad_input(tiny_sd_vae_dir, bad, tmp_path, capsys, case, flags, pattern):
    base = ["--vae", tiny_sd_vae_dir, "--data_format", "mnist", "--img_size", "32", "--wandb", "0",
            "--num_workers", "0", "--lpips", "0", "--max_steps", "1", "--batch_size", "2"]
    run_training_row(finetune_decoder.main, base, flags, bad, tmp_path, capsys, pattern)


# ---------------------------------------------------------------------------------------------------- scripts
@pytest.fixture
def grid_files(tmp_path):
    """A 2x2 grid of 16 px cells with its JSON, and copies whose JSON is corrupt, of another grid or ill-typed."""
    d = tmp_path / "inputs"
    d.mkdir(exist_ok=True)
    grid, layout = make_grid([np.full((16, 16, 3), 40 * (i + 1), np.uint8) for i in range(4)])
    layouts = {"grid": json.dumps(dict(layout, cells=[{}] * 4)), "corrupt": "{not json",
               "other": json.dumps(dict(rows=4, cols=4, cell_height=64, cell_width=64, pad=2)),
               "typed": json.dumps(dict(rows="two", cols=2, cell_height=16, cell_width=16, pad=2))}
    for name, text in layouts.items():
        write_png(d / f"{name}.png", grid)
        (d / f"{name}.json").write_text(text)
    write_png(d / "plain.png", grid)  # no JSON beside it
    (d / "afile").write_text("x")
    (d / "damaged.mp4").write_bytes(b"not a video")
    return d


EXTRACT_ROWS = [
    ("missing_input", ["{d}/nope.png"], r"nope.png not found"),
    ("not_an_image", ["{d}/afile"], r"cannot read .*afile"),
    ("damaged_video", ["{d}/damaged.mp4"], r"damaged.mp4: Could not load meta information; pass a grid PNG or MP4$"),
    ("corrupt_json", ["{d}/corrupt.png"], r"grid JSON .*corrupt.json is not valid JSON"),
    ("json_of_another_grid", ["{d}/other.png"], r"describes 4x4 cells of 64x64 px .* but the picture is 38x38 px"),
    ("json_ill_typed", ["{d}/typed.png"], r"grid JSON .*typed.json has no valid rows"),
    ("cell_height_0", ["{d}/grid.png", "-H", "0"], r"argument -H/--height: invalid positive value: '0'"),
    ("cell_too_large", ["{d}/plain.png", "-H", "999"], r"cells of 999x999 px .* do not fit a 38x38 px grid"),
    ("ids_outside", ["{d}/grid.png", "--ids", "9"], r"ids \[9\] are outside the 4 cells of this grid \(0..3\)"),
    ("output_dir_is_a_file", ["{d}/grid.png", "--output_dir", "{d}/afile"], r"'.*afile' is a file, not a folder"),
    ("unknown_flag", ["{d}/grid.png", "--rows", "2"], r"unrecognized arguments: --rows 2"),
]


def test_ctrl_c_outside_a_training_loop_is_one_line(capsys):
    """Ctrl-C while sampling or loading: one line and the shell's status 130, not a traceback."""
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_cli(interrupted)
    assert exit_info.value.code == 130 and capsys.readouterr().err == "error: interrupted (Ctrl-C)\n"


@pytest.mark.parametrize("entry,argv,then", [
    (sample, [], "; the same command again goes on where this run stopped"),
    (evaluate, ["--generate", "1"], "; the same command again goes on where this run stopped"),
    (evaluate, ["--images", "x"], ""),  # nothing to go on with: scores are computed again
])
def test_ctrl_c_while_sampling_says_the_same_command_goes_on(entry, argv, then, monkeypatch, capsys):
    def interrupted(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(entry, "main", interrupted)
    monkeypatch.setattr(sys, "argv", ["x.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        entry.cli()
    assert exit_info.value.code == 130 and capsys.readouterr().err == f"error: interrupted (Ctrl-C){then}\n"


@pytest.mark.parametrize("case,args,pattern", EXTRACT_ROWS, ids=[r[0] for r in EXTRACT_ROWS])
def test_extract_images_bad_input(grid_files, tmp_path, capsys, case, args, pattern):
    if case in ("corrupt_json", "json_of_another_grid", "json_ill_typed"):
        args = args + ["--output_dir", "{d}/../cells"]
    argv = [a.format(d=grid_files) for a in args]
    expect_exit_2(lambda: run_cli(extract_images.main, argv), capsys, pattern)
    assert outputs(tmp_path, grid_files) == []  # no clipped cells from a JSON of another grid


@pytest.mark.parametrize("args,pattern", [
    (["{d}/nope.mp4"], r"nope.mp4 not found"),
    (["{d}/grid.png", "{d}/../out", "-H", "0"], r"argument -H/--rows: invalid positive value"),
    (["{d}/corrupt.png", "{d}/../out"], r"corrupt.json is not valid JSON"),
    (["{d}/grid.png", "{d}/afile"], r"'.*afile' is a file, not a folder"),
])
def test_extract_image_from_video_bad_input(grid_files, tmp_path, capsys, args, pattern):
    argv = [a.format(d=grid_files) for a in args]
    expect_exit_2(lambda: run_cli(extract_image_from_video.main, argv), capsys, pattern)
    assert outputs(tmp_path, grid_files) == []


LAUNCHER_ROWS = [
    ("test_train_image.sh", ["abc", "32"], {}, r"^error: EPOCHS must be a whole number >= 1, got 'abc'"),
    ("test_train_image.sh", ["1", "abc"], {}, r"^error: BATCH must be a whole number >= 1, got 'abc'"),
    ("test_train_image.sh", ["0", "32"], {}, r"^error: EPOCHS must be a whole number >= 1, got '0'"),
    ("test_train_image.sh", ["1", "32", "nope.yaml"], {}, r"^error: config nope.yaml not found"),
    ("test_train_video.sh", ["-1"], {}, r"^error: EPOCHS must be a whole number >= 1, got '-1'"),
    ("test_train_image.sh", [], {"NGPUS": "two"}, r"^error: NGPUS must be a positive number of processes"),
    ("test_sample_video.sh", ["a fox", "none", "abc"], {}, r"^error: TARGET_LENGTH must be a whole number >= 1"),
    ("test_sample_video.sh", ["a fox", "nope.png"], {}, r"^error: input image 'nope.png' not found"),
    ("test_sample_image.sh", ["a fox", "nope.png"], {}, r"^error: input image 'nope.png' not found"),
    ("test_sample_image.sh", ["a fox"], {"CONFIG": "nope.yaml"}, r"^error: config nope.yaml not found"),
    ("test_sample_video.sh", ["a fox"], {"CONFIG": "nope.yaml"}, r"^error: config nope.yaml not found"),
]


@pytest.mark.parametrize("script,args,env,pattern", LAUNCHER_ROWS)
def test_launcher_bad_positional_arguments(script, args, env, pattern):
    """Checked before anything starts: one error line and exit 2, also where torchrun would have launched."""
    proc = subprocess.run(["bash", f"scripts/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=LIMIT_S, env={**os.environ, "NGPUS": "2", **env})
    assert proc.returncode == 2 and re.search(pattern, proc.stderr.strip()), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------- Python API
@pytest.fixture(scope="module")
def pipe(tiny_t2i):
    return STARFlowPipeline.from_pretrained(tiny_t2i["config"], tiny_t2i["pth"])


API_ROWS = [
    (dict(prompt=None), TypeError, r"prompt must be a string or a list of strings, got None"),
    (dict(prompt=123), TypeError, r"prompt must be a string or a list of strings, got int 123"),
    (dict(prompt=["a cat", 5]), TypeError, r"prompt must be a string or a list of strings"),
    (dict(prompt=[]), ValueError, r"prompt is an empty list"),
    (dict(generator=5), TypeError, r"generator must be a torch.Generator .* got int 5"),
    (dict(generator=[torch.Generator()] * 3), ValueError, r"generator: got 3 generators for 1 samples"),
    (dict(num_samples=0), ValueError, r"num_samples must be >= 1; got 0"),
    (dict(num_samples=1.5), TypeError, r"num_samples must be a whole number, got float 1.5"),
    (dict(cfg="strong"), TypeError, r"cfg must be a number, got str"),
    (dict(cfg=float("inf")), ValueError, r"cfg must be a finite number; got inf"),
    (dict(aspect_ratio=1.5), TypeError, r"aspect_ratio must be a 'W:H' string"),
    (dict(jacobi=True, jacobi_block_size=0), ValueError, r"jacobi_block_size must be >= 1; got 0"),
    (dict(attn_temp=0), ValueError, r"attn_temp must be > 0; got 0"),
    (dict(prior_temp=-1), ValueError, r"prior_temp must be >= 0; got -1"),
    (dict(denoiser="best"), ValueError, r"denoiser must be one of auto, learned, score, none; got 'best'"),
    (dict(output_type="tensor"), ValueError, r"output_type must be one of pil, np, latent; got 'tensor'"),
    (dict(target_length=5), ValueError, r"target_length is for video models"),
    (dict(input_image=3), ValueError, r"needs a video model"),
]


@pytest.mark.parametrize("kwargs,error,pattern", API_ROWS, ids=[next(iter(r[0])) + "-" + str(i)
                                                               for i, r in enumerate(API_ROWS)])
def test_pipeline_call_names_the_argument(pipe, kwargs, error, pattern):
    kwargs = dict(dict(prompt="a cat"), **kwargs)
    with pytest.raises(error, match=pattern):
        pipe(kwargs.pop("prompt"), **kwargs)


def test_pipeline_loading_arguments(tiny_t2i):
    load = lambda **kw: STARFlowPipeline.from_pretrained(tiny_t2i["config"], tiny_t2i["pth"], **kw)  # noqa: E731
    assert load(dtype="float16").dtype == torch.float16  # a dtype may be named
    with pytest.raises(ValueError, match="dtype 'int8' is not supported; use auto, float32, bfloat16, float16"):
        load(dtype="int8")
    with pytest.raises(TypeError, match="dtype must be a torch.float32/bfloat16/float16 or its name"):
        load(dtype=torch.int8)
    with pytest.raises(ValueError, match="device 'cuda': this machine has no usable CUDA GPU"):
        load(device="cuda")
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'; did you mean 'lr'"):
        load(overrides={"learning_rate": 1e-3})
    with pytest.raises(TypeError, match="checkpoint_path must be a path, got int"):
        STARFlowPipeline.from_pretrained(tiny_t2i["config"], 5)
    folder = os.path.dirname(tiny_t2i["pth"])  # weights alone, no config.yaml beside them
    with pytest.raises(ValueError, match=r"is not a checkpoint folder with a config.yaml; pass the YAML config and "
                                         r"the checkpoint: from_pretrained\(config_path, checkpoint_path\)"):
        STARFlowPipeline.from_pretrained(folder)


def test_call_defaults_are_the_argument_table():
    """__call__'s signature and ARGUMENTS (which check_inputs and sample.py's flags use) give the same defaults."""
    import inspect
    params = inspect.signature(STARFlowPipeline.__call__).parameters
    assert {k: params[k].default for k in ARGUMENTS} == {k: spec.default for k, spec in ARGUMENTS.items()}


# --------------------------------------------------------------------------------------- every key has a range
def test_every_numeric_key_has_a_range_or_choices():
    schemas = [SCHEMA, sample.SAMPLE_KEYS, finetune_decoder.EXTRA_KEYS, evaluate.EVAL_KEYS, ARGUMENTS]
    loose = [k for schema in schemas for k, spec in schema.items()
             if spec.kind in ("int", "float", "ints", "floats") and not isinstance(spec, Compat)
             and spec.choices is None and spec.low is None and spec.above is None]
    assert loose == []


@pytest.mark.parametrize("key", sorted(k for k, s in SCHEMA.items() if s.kind in ("int", "float")
                                       and not isinstance(s, Compat) and s.choices is None))
def test_every_numeric_key_refuses_a_value_below_its_range(key):
    spec = SCHEMA[key]
    bound = spec.above if spec.above is not None else spec.low
    with pytest.raises(UserError, match=rf"config key '{key}' must be .*{bound}"):
        load_config(None, {key: bound - 1 if spec.kind == "int" or spec.above is None else bound})


# --------------------------------------------------------------------------------------------------- full disk
class FullDisk:
    """Writes under `root` fail with ENOSPC once `budget` bytes are written, the way a full file system fails:
    from inside open().write (PIL, JSON, YAML, torch.save) and inside safetensors (its own error text)."""

    def __init__(self, monkeypatch, root, budget):
        import builtins

        from safetensors.torch import save_file
        self.root, self.budget, real_open = str(root), budget, builtins.open
        disk = self

        class Writer:
            def __init__(self, f):
                self.f = f

            def write(self, data):
                disk.budget -= len(data)
                if disk.budget < 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return self.f.write(data)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def __iter__(self):
                return iter(self.f)

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            writing = any(c in mode for c in "wax+")
            return Writer(f) if writing and os.path.abspath(str(file)).startswith(disk.root) else f

        def fake_save_file(tensors, filename, metadata=None):
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            if os.path.abspath(str(filename)).startswith(disk.root):
                disk.budget -= size
                if disk.budget < 0:
                    raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
            save_file(tensors, filename, metadata=metadata)
        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr("utils.checkpoint.save_file", fake_save_file)


def final_files_are_complete(folder):
    """No temporary file is left, and every PNG and JSON under a final name opens."""
    names = [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files]
    assert not [n for n in names if ".tmp" in os.path.basename(n)], names
    for name in names:
        if name.endswith(".png"):
            Image.open(name).load()
        elif name.endswith(".json"):
            json.load(open(name))
    return names


@pytest.mark.parametrize("budget", [0, 3000])  # nothing fits; the first sample fits and its JSON or the next not
def test_full_disk_while_sampling(tiny_t2i, tmp_path, capsys, monkeypatch, budget):
    out = tmp_path / "out"
    FullDisk(monkeypatch, out, budget)
    argv = ["--model_config_path", tiny_t2i["config"], "--checkpoint_path", tiny_t2i["pth"], "--caption", "a cat",
            "--num_samples", "4", "--sample_batch_size", "1", "--output_dir", str(out)]
    monkeypatch.setattr(sys, "argv", ["sample.py", *argv])
    expect_exit_2(sample.cli, capsys, r"^error: no space left on the device writing .*out/a_cat_.*; free some space")
    names = final_files_are_complete(out)
    assert len(names) < 8  # it stopped at the first failed write


def test_full_disk_while_sampling_video(tiny_t2v, tmp_path, capsys, monkeypatch):
    """ffmpeg does not report a full disk to imageio: an MP4 cut short must not take its final name."""
    import utils.image
    out = tmp_path / "out"

    def cut_short(path, frames, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 12 + b"\x00\x00\x01\x00mdat")  # no moov: cut short
    monkeypatch.setattr(utils.image.imageio, "mimwrite", cut_short)
    monkeypatch.setattr(utils.image.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    monkeypatch.setattr(sys, "argv", ["sample.py", "--model_config_path", tiny_t2v["config"], "--checkpoint_path",
                                      tiny_t2v["pth"], "--caption", "a cat", "--num_samples", "1",
                                      "--output_dir", str(out)])
    expect_exit_2(sample.cli, capsys, r"^error: no space left on the device writing .*a_cat_0000.mp4")
    assert [n for n in final_files_are_complete(out) if n.endswith(".mp4")] == []


def test_full_disk_while_checkpointing_keeps_the_previous_latest(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    cfg = load_config(None, [])
    T.save_checkpoint(str(tmp_path), 1, model, {"model": opt}, cfg, {"epoch": 0}, True)
    before = {n: open(tmp_path / "checkpoints" / "latest" / n, "rb").read() for n in
              ("model.safetensors", "training_state.pt", "config.yaml")}
    for budget in (0, 200, 1200):  # fails in the weights, the training state or the config
        disk = FullDisk(monkeypatch, tmp_path, budget)
        with pytest.raises(UserError, match=r"checkpoint of step 2 not written \(no space left on the device.*"
                                            r"checkpoints/latest still points at the previous one"):
            T.save_checkpoint(str(tmp_path), 2, model, {"model": opt}, cfg, {"epoch": 0}, True)
        monkeypatch.undo()
        assert disk.budget < 0
        assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_0000001"]  # no half folder left
        assert os.readlink(tmp_path / "checkpoints" / "latest") == "step_0000001"
        for name, data in before.items():
            assert open(tmp_path / "checkpoints" / "latest" / name, "rb").read() == data


def test_full_disk_during_training_is_one_error_line(tiny_t5_dir, tmp_path, capsys, monkeypatch):
    """The whole train.py: a full disk at a checkpoint ends the run with one error line and exit 2."""
    monkeypatch.setattr(T, "save_weights", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    argv = TRAIN + ["--text", tiny_t5_dir, "--logdir", str(tmp_path / "logs"), "--ckpt_every", "1"]
    expect_exit_2(lambda: train.main(argv), capsys, r"checkpoint of step 1 not written \(no space left")
    assert not os.path.exists(tmp_path / "logs" / "dummy" / "checkpoints" / "latest")


def test_a_file_to_write_that_is_a_folder_is_one_line(tmp_path):
    """Every atomic write (reports, statistics, checkpoints, converted weights) refuses a folder in its place."""
    (tmp_path / "report.json").mkdir()
    with pytest.raises(UserError, match=r"report.json' is a folder, not a file; give a file name"):
        write_json(tmp_path / "report.json", {})


def test_generated_samples_under_a_file_are_one_line(tiny_t2i, tmp_path, capsys):
    (tmp_path / "regular").write_text("")
    (tmp_path / "ref").mkdir()
    for i in range(2):
        write_png(tmp_path / "ref" / f"{i}.png", np.full((32, 32, 3), 40 * i, np.uint8))
    with pytest.raises(SystemExit) as exit_:
        run_cli(evaluate.main, ["--model_config_path", tiny_t2i["config"], "--checkpoint_path", tiny_t2i["pth"],
                                "--generate", "1", "--caption", "a", "--num_samples", "1",
                                "--ref", str(tmp_path / "ref"), "--images", str(tmp_path / "regular" / "x"),
                                "--logdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert re.search(r"^error: --images folder '.*' cannot be created: '.*regular' is a file; choose a folder$", err,
                     re.M)


def test_disk_error_from_a_library_message():
    from utils.errors import disk_error
    assert "no space left" in str(disk_error(RuntimeError("I/O error: No space left on device (os error 28)")))
    assert disk_error(RuntimeError("shape mismatch")) is None
    assert "read-only" in str(disk_error(OSError(errno.EROFS, "Read-only file system", "/x/y.png")))


# ------------------------------------------------------------------------------------------- names and values
def sample_run(model, out, caption, capsys):
    assert sample.main(["--model_config_path", model["config"], "--checkpoint_path", model["pth"], "--caption",
                        caption, "--num_samples", "2", "--sample_batch_size", "2", "--output_dir", str(out)]) == 0
    return capsys.readouterr().out


def test_a_second_run_into_the_same_folder_numbers_on(tiny_t2i, tmp_path, capsys):
    """Prompts whose names reduce to the same file name ('a cat!', 'a cat?') keep both runs' files."""
    out = tmp_path / "out"
    sample_run(tiny_t2i, out, "a cat!", capsys)
    first = {n: open(out / n, "rb").read() for n in os.listdir(out)}
    said = sample_run(tiny_t2i, out, "a cat?", capsys)
    assert "already holds a_cat_* files from an earlier run; this run writes a_cat-2_*" in said
    assert all(open(out / n, "rb").read() == data for n, data in first.items())  # nothing overwritten
    assert json.load(open(out / "a_cat-2_0001.json"))["prompt"] == "a cat?"
    assert json.load(open(out / "a_cat-2_grid.json"))["cells"][0]["file"] == "a_cat-2_0000"
    sample_run(tiny_t2i, out, "a cat.", capsys)
    assert os.path.isfile(out / "a_cat-3_grid.png") and len(os.listdir(out)) == 3 * 6


def test_sixteen_bit_grey_input_image_keeps_its_grey(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((20, 30), 32768, np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = load_image(str(path), (16, 16))
    assert pixels.abs().max() < 0.01  # mid-grey (0 in [-1, 1]), not white (PIL's convert clips at 255)
    float_grey = Image.fromarray(np.full((8, 8), 0.25, np.float32))
    assert load_image(float_grey, (8, 8)).mean().item() == pytest.approx(0.25 * 2 - 1, abs=0.01)


def test_a_json_of_another_grid_writes_no_clipped_cells(grid_files, tmp_path):
    with pytest.raises(UserError, match="belongs to another grid"):
        extract_images.main([str(grid_files / "other.png"), "--output_dir", str(tmp_path / "cells")])
    assert not (tmp_path / "cells").exists()
    assert extract_images.main([str(grid_files / "grid.png"), "--output_dir", str(tmp_path / "cells")]) == 0
    assert len(os.listdir(tmp_path / "cells")) == 4


def test_resume_without_latest_takes_the_newest_complete_step(tmp_path):
    """A kill between the folder rename and the `latest` switch leaves no (or a dangling) link: resume still works."""
    root = tmp_path / "checkpoints"
    for step in ("step_0000001", "step_0000002", "step_0000003.5f2a.tmp"):
        (root / step).mkdir(parents=True)
        (root / step / "training_state.pt").write_bytes(b"")
    os.symlink("step_0000009", root / "latest")
    assert T.resolve_resume(str(tmp_path)) == ("state", str((root / "step_0000002").resolve()))


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    with T.open_metrics(str(path), 2) as f:
        f.write(json.dumps({"step": 3}) + "\n")
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_training_caption_that_is_not_utf8_is_skipped_and_named(tmp_path):
    from dataset import FolderDataset
    for i in range(3):
        write_png(tmp_path / f"im{i}.png", np.full((8, 8, 3), 60 * i, np.uint8))
        (tmp_path / f"im{i}.txt").write_text(f"picture {i}")
    (tmp_path / "im1.txt").write_bytes("caf\xe9".encode("latin-1"))
    data = FolderDataset(tmp_path, 8, 1)
    assert [c for _, c in data.items] == ["picture 0", "picture 2"]
    assert data.skipped_at_scan == [str(tmp_path / "im1.txt")]  # train.py reports it with the unreadable files


def test_the_time_limit_ends_a_hang():
    """The guard of every test here: a call that never returns fails the test (shortened to 1 s)."""
    import time
    signal.alarm(1)
    with pytest.raises(pytest.fail.Exception, match="must not hang"):
        while True:
            time.sleep(0.01)
    signal.alarm(LIMIT_S)


def test_the_flow_itself_refuses_settings_that_never_end():
    """Below the pipeline, too: a Jacobi block of 0 tokens would loop forever, attn_temp 0 divides by zero."""
    from conftest import tiny_inputs, tiny_model
    model = tiny_model()
    noise, y = tiny_inputs(model)
    with pytest.raises(ValueError, match="jacobi_block_size >= 1"):
        model.reverse(noise, y, jacobi=True, jacobi_block_size=0)
    with pytest.raises(ValueError, match="attn_temp must be > 0"):
        model.reverse(noise, y, attn_temp=0)
