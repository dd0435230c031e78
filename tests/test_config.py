"""Config loading: original YAML format, plain mappings, CLI overrides, errors, Model kwargs, --help."""
import os
import re
import subprocess
import sys

import pytest

from utils.config import SCHEMA, Compat, load_config, model_kwargs, parse_vid_size, save_config
from utils.errors import UserError

ORIGINAL = """arguments:
  - img_size: 256
  - txt_size: 128
  - channel_size: 4
  - channels: 3072
  - blocks: 6
  - layers_per_block: 2 2 2 2 2 24
  - lr: 6.4e-5
  - finetuned_vae: none
  - cfg: 2.5
  - vid_size: 81:16
  - vae: Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6
  - gradient_checkpoint: 1
  - seq_order: L2R
"""


@pytest.fixture
def original(tmp_path):
    p = tmp_path / "orig.yaml"
    p.write_text(ORIGINAL)
    return p


def test_original_format(original):
    cfg = load_config(original, [])
    assert cfg.img_size == 256 and cfg.channels == 3072
    assert cfg.layers_per_block == [2, 2, 2, 2, 2, 24]
    assert cfg.lr == pytest.approx(6.4e-5) and isinstance(cfg.lr, float)
    assert cfg.finetuned_vae is None and cfg.cfg == [2.5]
    assert cfg.vid_size == "81:16" and cfg.vae == "Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6"
    assert cfg.batch_size == SCHEMA["batch_size"].default  # not in the YAML: the parser default
    assert cfg.model_config_path == str(original)


@pytest.mark.parametrize("style", ["space", "equals", "dict"])
def test_overrides_beat_yaml(original, style):
    overrides = {
        "space": ["--lr", "1e-3", "--layers_per_block", "1", "3", "--vae", "none"],
        "equals": ["--lr=1e-3", "--layers_per_block=1 3", "--vae=none"],
        "dict": {"lr": 1e-3, "layers_per_block": [1, 3], "vae": "none"},
    }[style]
    cfg = load_config(original, overrides)
    assert cfg.lr == pytest.approx(1e-3) and cfg.layers_per_block == [1, 3] and cfg.vae is None
    assert cfg.img_size == 256  # YAML value stands where no flag is given


def test_model_config_path_from_cli_and_dash_names(original):
    cfg = load_config(None, ["--model-config-path", str(original), "--batch-size", "8"])
    assert cfg.img_size == 256 and cfg.batch_size == 8


def test_plain_mapping_roundtrip(tmp_path, original):
    cfg = load_config(original, ["--train_seed", "3"])
    out = tmp_path / "saved.yaml"
    save_config(cfg, out)
    back = load_config(out, []).to_dict()
    assert back.pop("model_config_path") == str(out)
    expected = cfg.to_dict()
    expected.pop("model_config_path")
    assert back == expected
    plain = tmp_path / "plain.yaml"
    plain.write_text("img_size: 64\nlayers_per_block: [1, 2]\nrope: true\nnum_heads: ~\nvid_size: '9:8'\n")
    cfg = load_config(plain)
    assert (cfg.img_size, cfg.layers_per_block, cfg.rope, cfg.num_heads, cfg.vid_size) == (64, [1, 2], 1, None, "9:8")


@pytest.mark.parametrize("where", ["cli", "yaml", "dict"])
def test_unknown_key_suggests_closest(tmp_path, where):
    path = None
    overrides = []
    if where == "cli":
        overrides = ["--layer_per_block", "2"]
    elif where == "dict":
        overrides = {"layer_per_block": 2}
    else:
        path = tmp_path / "bad.yaml"
        path.write_text("arguments:\n  - layer_per_block: 2\n")
    with pytest.raises(UserError, match="unknown config key 'layer_per_block'.*'layers_per_block'"):
        load_config(path, overrides)


@pytest.mark.parametrize("spelling, meant", [("use_ema", "ema_weights"), ("ema", "ema_decay"),
                                             ("guidance_scale", "cfg")])
def test_other_tools_spellings_name_the_key(spelling, meant):
    with pytest.raises(UserError, match=f"unknown config key '{spelling}'; did you mean '{meant}'"):
        load_config(None, [f"--{spelling}", "1"])


@pytest.mark.parametrize("overrides, message", [
    (["--img_size", "big"], "img_size"),
    (["--batch_size", "0"], "batch_size"),
    (["--vid_size", "81"], "frames:fps"),
    (["--lr", "1", "2"], "one value"),
    (["--cfg", "2", "4"], "'cfg' takes one guidance scale, got 2 4; run once per scale"),  # (was: 4 ignored)
    (["--ema_decay", "1"], "'ema_decay' must be below 1, got 1: at 1 the average keeps the initial weights"),
    (["stray"], "unexpected"),
])
def test_bad_values(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_extra_keys_for_other_entry_points():
    from utils.config import Key
    cfg = load_config(None, ["--checkpoint_path", "a.pth"], extra_keys={"checkpoint_path": Key(None, "str", "w")})
    assert cfg.checkpoint_path == "a.pth"


def test_model_kwargs(original):
    cfg = load_config(original, ["--gradient_checkpoint_mlp", "1", "--sos", "1", "--rope", "1"])
    kw = model_kwargs(cfg, latent_size=40, txt_dim=2048)
    assert kw["in_channels"] == 4 and kw["img_size"] == 40 and kw["txt_dim"] == 2048 and kw["txt_size"] == 128
    assert kw["num_blocks"] == 6 and kw["layers_per_block"] == [2, 2, 2, 2, 2, 24]
    assert kw["use_checkpoint"] == 1 and kw["use_checkpoint_mlp"] == 1 and kw["sos"] and kw["rope"]
    assert kw["seq_order"] == "L2R"
    single = model_kwargs(load_config(None, ["--blocks", "3", "--layers_per_block", "2"]), 8)
    assert single["num_blocks"] == 3 and single["layers_per_block"] == [2, 2, 2]


def test_parse_vid_size():
    assert parse_vid_size("81:16") == (81, 16.0)
    assert parse_vid_size("9:8:16") == (9, 8.0)


COMPAT = {k: v for k, v in SCHEMA.items() if isinstance(v, Compat)}


def test_every_original_no_op_key_is_a_compatibility_key():
    assert set(COMPAT) == {"use_pretrained_lm", "adaln", "nvp", "use_mm_attn", "noise_embed_denoiser", "fp8",
                           "use_8bit_adam", "compile", "loss_scaling", "vae_decoder_factor", "wds"}


@pytest.mark.parametrize("key", sorted(COMPAT))
def test_compatibility_keys_load_original_values_and_refuse_others(key, tmp_path):
    spec = COMPAT[key]
    for value in spec.choices:
        yaml_file = tmp_path / "c.yaml"
        yaml_file.write_text(f"arguments:\n  - {key}: {'none' if value is None else value}\n")
        assert getattr(load_config(yaml_file), key) == value
    bad = "gemma3_4b" if spec.kind == "str" else 7
    with pytest.raises(UserError, match=rf"'{key}: {bad}' asks for .*, which is not supported; remove the key"):
        load_config(None, {key: bad})


def test_wds_1_needs_shards(tmp_path):
    from dataset import detect_format
    assert detect_format(load_config(None, ["--wds", "1", "--data", str(tmp_path / "a-{000..001}.tar")])) == "wds"
    with pytest.raises(UserError, match="wds: 1 asks for webdataset shards"):
        detect_format(load_config(None, ["--wds", "1", "--data", str(tmp_path)]))


@pytest.mark.parametrize("overrides, message", [
    (["--norm_type", "batch_norm"], "norm_type' must be one of layer_norm, rms_norm"),
    (["--seq_order", "T2B"], "seq_order' must be one of L2R, R2L"),
    (["--noise_type", "laplace"], "noise_type' must be one of gaussian, uniform"),
    (["--data_format", "imagenet"], "data_format' must be one of auto"),
])
def test_enumerations(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_blocks_follow_layers_per_block_unless_they_disagree_where_both_are_set(tmp_path, original):
    assert load_config(None, ["--layers_per_block", "1", "1", "4"]).blocks == 3  # the default 4 follows
    assert load_config(original, ["--layers_per_block", "1", "3"]).blocks == 2  # a later override wins
    with pytest.raises(UserError, match="blocks 4 but layers_per_block lists 3 blocks"):
        load_config(None, ["--blocks", "4", "--layers_per_block", "1", "1", "4"])
    saved = tmp_path / "saved.yaml"
    saved.write_text("blocks: 4\nlayers_per_block: [1, 1, 4]\n")
    with pytest.raises(UserError, match="blocks 4 but layers_per_block lists 3"):
        load_config(saved)
    assert load_config(None, ["--blocks", "3", "--layers_per_block", "2"]).blocks == 3


@pytest.mark.parametrize("fmt", ["mnist", "colour_mnist", "moving_mnist"])
def test_built_in_data_refuses_a_data_path_it_would_ignore(tmp_path, fmt):
    """A demo config (colour MNIST) with --data my_images must not quietly train or evaluate on MNIST."""
    demo = tmp_path / "demo.yaml"
    demo.write_text(f"data_format: {fmt}\n")
    with pytest.raises(UserError, match=f"data_format {fmt} makes its own digits and reads no --data, but data is "
                                        f"'{tmp_path}'; pass --data_format auto"):
        load_config(demo, ["--data", str(tmp_path)])
    assert load_config(demo, ["--data", str(tmp_path), "--data_format", "auto"]).data == str(tmp_path)
    assert load_config(demo).data_format == fmt  # the default data path is not a request
    saved = tmp_path / "saved.yaml"  # a run's config from before the check: it still loads, to sample or resume
    saved.write_text(f"data_format: {fmt}\ndata: {tmp_path}\n")
    assert load_config(saved).data_format == fmt


def test_holdout_is_dropped_by_a_later_data_format_and_refused_beside_its_own(tmp_path):
    demo = tmp_path / "demo.yaml"
    demo.write_text("data_format: colour_mnist\nholdout: '7:red'\n")
    assert load_config(demo).holdout == "7:red"
    assert load_config(demo, ["--data_format", "auto", "--data", str(tmp_path)]).holdout is None
    with pytest.raises(UserError, match="'holdout' applies to data_format colour_mnist only"):
        load_config(demo, ["--data_format", "mnist", "--holdout", "7:red"])
    with pytest.raises(UserError, match="'holdout' applies to data_format colour_mnist only"):
        load_config(None, ["--holdout", "7:red"])


@pytest.mark.parametrize("entry,keys", [("train", "utils.config.SCHEMA"), ("sample", "sample.SAMPLE_KEYS"),
                                        ("evaluate", "evaluate.EVAL_KEYS"),
                                        ("finetune_decoder", "finetune_decoder.EXTRA_KEYS")])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_flag(entry, keys, flag, capsys):
    """Every entry point answers --help with its docstring and a line per flag, and runs nothing."""
    import importlib

    module = importlib.import_module(entry)
    owner, name = keys.rsplit(".", 1)
    listed = getattr(importlib.import_module(owner), name)
    assert module.main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith(module.__doc__.splitlines()[0])
    lines = [line for line in out.splitlines() if line.startswith("  --")][:len(listed)]
    assert [f"--{key}" for key in listed] == [line.split()[0] for line in lines]
    for line, spec in zip(lines, listed.values()):  # each with its meaning, default and range
        assert spec.help in line and (spec.default is None or f"default {spec.default}" in line)
        assert spec.accepts() in line
    # a command's line continuation is printed as written (an unescaped one would join the lines mid-docstring)
    assert not re.search(r"\S {4,}--", module.__doc__)


def test_help_into_a_closed_pipe_is_quiet():
    """`python train.py --help | head -1` closes the pipe early: exit 0 with no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # before the child writes a byte, so its first write meets a broken pipe
    try:
        done = subprocess.run([sys.executable, "train.py", "--help"], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    finally:
        os.close(write_end)
    assert done.returncode == 0 and done.stderr == ""
