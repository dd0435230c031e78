"""Model weights: official .pth (weights_only, nesting, prefixes, deprecated buffers), safetensors, misfit errors,
atomic saving, and scripts/convert_checkpoint.py."""
import os
import pickle

import pytest
import torch
import yaml

from scripts.convert_checkpoint import main as convert_main
from transformer_flow import DEPRECATED_KEYS, Model
from utils.checkpoint import load_model_weights, load_state_dict_file, save_weights
from utils.config import load_config, model_kwargs
from utils.errors import UserError


def tiny_model(config_path, **changes):
    cfg = load_config(config_path, changes)
    return Model(**model_kwargs(cfg, cfg.img_size // 8, 32))


def test_pth_and_safetensors_load_the_same_weights(tiny_t2i):
    want = torch.load(tiny_t2i["pth"], weights_only=True)
    for path in (tiny_t2i["pth"], tiny_t2i["safetensors"]):
        model = load_model_weights(tiny_model(tiny_t2i["config"]), path, skip=DEPRECATED_KEYS.match)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, want[k], rtol=0, atol=0)


def test_nested_prefixed_official_layout(tiny_t2i, tmp_path):
    state = torch.load(tiny_t2i["pth"], weights_only=True)
    official = {f"module._orig_mod.{k}": v for k, v in state.items()}
    official["module.var"] = torch.zeros(16, 4)  # deprecated buffers of the original release
    official["module.blocks.0.attn_mask"] = torch.ones(24, 24)
    official["module.feat_rope.freqs_cos"] = torch.zeros(24, 16)
    torch.save({"model": official, "epoch": 3}, tmp_path / "wrapped.pth")
    model = load_model_weights(tiny_model(tiny_t2i["config"]), tmp_path / "wrapped.pth", skip=DEPRECATED_KEYS.match)
    torch.testing.assert_close(model.state_dict()["blocks.0.proj_in.weight"], state["blocks.0.proj_in.weight"])


def test_misfit_names_keys_and_shapes(tiny_t2i):
    with pytest.raises(UserError, match=r"blocks\.0\.proj_in\.weight: file \(32, 4\) vs model \(48, 4\).*"
                                        r"--model_config_path"):
        load_model_weights(tiny_model(tiny_t2i["config"], channels=48), tiny_t2i["pth"])
    with pytest.raises(UserError, match=r"missing keys: blocks\.1\.attn_blocks\.1\..*unexpected keys: blocks\.2\."):
        load_model_weights(tiny_model(tiny_t2i["config"], layers_per_block="1 2"), tiny_t2i["pth"])


class NotWeights:
    pass


@pytest.mark.parametrize("content,match", [
    (None, "not found; the official checkpoints .* are at huggingface.co/apple/starflow"),
    (b"PK\x03\x04 truncated", "cannot read"),
    ("pickle", "holds more than tensors.*could run code"),
    ("list", "does not hold a state dict"),
])
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.pth"
    if content == "pickle":  # an arbitrary pickled object: weights_only refuses to run it
        with open(path, "wb") as f:
            pickle.dump(NotWeights(), f)
    elif content == "list":
        torch.save([torch.zeros(2)], path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=match):
        load_state_dict_file(path)


def test_missing_weights_of_another_kind_name_no_official_checkpoint(tmp_path):
    with pytest.raises(UserError, match=r"fine-tuned VAE file '.*nope.safetensors' not found; check the path$"):
        load_state_dict_file(tmp_path / "nope.safetensors", "fine-tuned VAE")


def test_dcp_folder_points_to_conversion(tmp_path):
    with pytest.raises(UserError, match="dcp_to_torch"):
        load_state_dict_file(tmp_path)


def test_save_weights_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights({"a": torch.ones(2)}, path)
    save_weights({"a": torch.zeros(3)}, path)
    assert os.listdir(tmp_path) == ["w.safetensors"]
    assert load_state_dict_file(path)["a"].shape == (3,)


def test_convert_checkpoint(tiny_t2i, tmp_path):
    out = tmp_path / "converted.safetensors"
    assert convert_main([tiny_t2i["pth"], "--model_config_path", tiny_t2i["config"], "--output", str(out)]) == 0
    resolved = yaml.safe_load((tmp_path / "converted.yaml").read_text())
    assert resolved["channels"] == 32 and resolved["layers_per_block"] == [1, 1, 2]
    a, b = load_state_dict_file(out), torch.load(tiny_t2i["pth"], weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = load_config(str(tmp_path / "converted.yaml"))
    assert model_kwargs(cfg, 4, 32) == model_kwargs(load_config(tiny_t2i["config"]), 4, 32)


def test_convert_refuses_misfit(tiny_t2i, tmp_path, capsys):
    config = tmp_path / "other.yaml"
    values = yaml.safe_load(open(tiny_t2i["config"]))
    config.write_text(yaml.safe_dump(dict(values, channels=64)))
    with pytest.raises(SystemExit) as exit_info:
        convert_main([tiny_t2i["pth"], "--model_config_path", str(config), "--output", str(tmp_path / "x.safetensors")])
    assert exit_info.value.code == 2
    assert "error: checkpoint" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
