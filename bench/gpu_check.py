"""The GPU check: correctness, 3B and 7B sampling, 3B FSDP2 training, the demo's sample.py and inversion, in one
prepared run.

    python bench/gpu_check.py --prepare gpu_assets          # here: what ../shared and the wheels cannot bring there
    python bench/gpu_check.py --device cuda                 # on one GPU (an H200: 6-7 minutes, estimated); to $OUT
    python bench/gpu_check.py --device cpu --tiny --out_dir /tmp/gpu_check   # every step on tiny stand-ins (CI)
    python bench/gpu_check.py --plan                        # the computed memory table of the README

Steps (--steps picks some):
  1 correctness: the golden cases in float32 (TF32 off, the CPU tolerances), the same passes in bf16 autocast (their
    error against float32), and tests/test_flow.py's invariants with STARFLOW_TEST_DEVICE set to the device;
  2 the 3B text-to-image model (official config, bf16, random weights): 8 images at 256x256 with guidance 3.6,
    sequential, Jacobi (block 16, th 1e-3), `jacobi="auto"` and sequential through compiled graphs
    (`compile_decode`, timed after the call that compiles); the original code on the same weights in the same
    process, for the ratio;
  3 the 7B text-to-video model: a 17-frame 480p clip with Jacobi (block 32, th 1e-3), extrapolated to 81 frames;
  4 3B training: train.py's Run steps on random latents, bf16, FSDP2 in a one-rank process group, the largest batch
    that fits with and without gradient checkpointing, step time, images/s, peak memory and MFU;
  5 sample.py on checkpoints/demo_mnist_t2i: bf16 on the device against float32 on the CPU, digits read by
    bench/demo_quality.py's classifier;
  6 inversion on the device (the demo, float32 and bf16): edits to a sample's own prompt and interpolation ends
    give the pixels back, inpainting keeps the pixels outside its mask.
Random weights cannot say how good a sample is; they time and size the real code paths. Text comes from a random
flan-t5-xl-shaped encoder (the real one cannot be downloaded there); sampling stops at latents (no VAE decode).
Writes gpu_check.json, gpu_check.md and demo_bf16_vs_fp32.png to --out_dir (default $OUT) as it goes.
"""
import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import demo_quality  # noqa: E402
import sample  # noqa: E402
from train import Run  # noqa: E402
from transformer_flow import DEPRECATED_KEYS, Model, RMSNorm  # noqa: E402
from utils import training as T  # noqa: E402
from utils.config import guidance_scale, load_config, model_kwargs  # noqa: E402
from utils.distributed import DistInfo  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.files import write_json, write_text  # noqa: E402
from utils.image import write_png  # noqa: E402
from utils.pipeline import STARFlowPipeline  # noqa: E402
from utils.text_encoder import TextEncoder  # noqa: E402

PEAK_BF16_FLOPS = 989e12  # H200 (SXM) dense bf16, the datasheet's; about 790e12 is reachable
PARAMS = {"3b": 3_858_281_544, "7b": 6_890_096_528}  # the official configs (../shared/golden/README.md)
CONFIG_3B = ROOT / "configs" / "starflow_3B_t2i_256x256.yaml"
CONFIG_7B = ROOT / "configs" / "starflow-v_7B_t2v_caus_480p.yaml"
TINY_3B = dict(channels=64, head_dim=32, layers_per_block=[1, 1, 1, 1, 1, 2], txt_size=8, img_size=64)
TINY_7B = dict(TINY_3B, top_block_channels=96)
FLAN_T5_XL = dict(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
                  feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, layer_norm_epsilon=1e-6, dropout_rate=0.0)
TINY_T5 = dict(FLAN_T5_XL, vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                 patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4)
PROMPTS = ["a film still of a cat playing piano", "a red circle on a white background", "a corgi looks at the camera",
           "a lighthouse on a cliff at dusk", "a bowl of ramen, studio photo", "an astronaut riding a horse",
           "a watercolor of a fox in the snow", "a city street at night in the rain"]
TINY_INVARIANTS = "inverse_of_forward and official"  # a few of test_flow.py's tests in --tiny
DEMO = ROOT / "checkpoints" / "demo_mnist_t2i"


# ------------------------------------------------------------------------------------------------ report
class Report:
    """One row per check, printed as it comes and rewritten to gpu_check.json / gpu_check.md after each."""

    def __init__(self, out, header):
        self.out, self.header, self.rows = Path(out), header, []

    def add(self, step, check, ok, summary, **figures):
        """ok: True (passed or measured), False (failed), None (skipped)."""
        self.rows.append(dict(step=step, check=check, ok=ok, summary=summary, **figures))
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[ok]
        print(f"[{step}] {mark} {check}: {summary}", flush=True)
        self.write()

    @property
    def failures(self):
        return sum(row["ok"] is False for row in self.rows)

    def write(self):
        write_json(self.out / "gpu_check.json", dict(self.header, failures=self.failures, checks=self.rows))
        lines = [f"GPU check on {self.header['device_name']}, {self.header['date']} (torch {self.header['torch']}"
                 f"{', tiny stand-ins' if self.header['tiny'] else ''}): {self.failures} failure(s)", "",
                 "| step | check | result | figures |", "|---|---|---|---|"]
        for row in self.rows:
            result = {True: "ok", False: "**FAIL**", None: "skipped"}[row["ok"]]
            lines.append(f"| {row['step']} | {row['check']} | {result} | {row['summary']} |")
        write_text(self.out / "gpu_check.md", "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------- measurement
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall seconds of a block, with the device's queued work finished at both ends."""

    def __init__(self, device):
        self.device, self.seconds = device, None

    def __enter__(self):
        sync(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    """Peak allocated GPU memory since the last reset_peak (None on the CPU, where it is not tracked)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def allocated_gib(device):
    return round(torch.cuda.memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def gib(value):
    return "n/a on cpu" if value is None else f"{value:.1f} GiB"


class FlowCalls:
    """Network calls of the flow steps, counted alike for ours and the original: calls of each step's first layer
    (the text prefix pass included)."""

    def __init__(self, blocks):
        self.n = 0
        self.handles = [b.attn_blocks[0].register_forward_pre_hook(self.hit) for b in blocks
                        if len(getattr(b, "attn_blocks", ()))]

    def hit(self, *args):
        self.n += 1

    def close(self):
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def one_rank_group(device):
    """A process group of this process alone (NCCL on CUDA, gloo on the CPU): FSDP2 shards inside it, and the
    original's Jacobi decoding all-reduces its stop flag whether or not there is a group."""
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = dict(device_id=device) if device.type == "cuda" else {}
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1, **extra)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------- random models
def init_random(model, seed, head_std=0.2):
    """Random weights for a model built on the meta device: N(0, 0.02) matrices and embeddings, norms at identity,
    zero biases, output heads of std head_std / sqrt(fan_in) (small but non-zero: every flow step moves its tokens,
    where a fresh model's zero heads make each step the identity)."""
    torch.manual_seed(seed)
    done = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                std = head_std / math.sqrt(module.in_features) if name.endswith("proj_out") else 0.02
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.zero_()  # RMSNorm scales by 1 + weight
            else:
                continue
            done |= {id(p) for p in module.parameters(recurse=False)}
        for p in model.parameters():
            if id(p) not in done:  # SOS token, learned positions
                p.normal_(0.0, 0.02)
    return model


def random_model(cfg, latent_size, txt_dim, device, dtype, seed=0):
    """The config's Model built on the meta device, then given `dtype` storage on `device` and random weights."""
    with torch.device("meta"):
        model = Model(**model_kwargs(cfg, latent_size, txt_dim))
    model = model.to(dtype).to_empty(device=device)
    return init_random(model, seed).eval().requires_grad_(False)


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def word_tokenizer(words):
    """A word-level tokenizer for the random text encoder (pad 0, eos 1, unk 2), made in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in sorted(set(words)):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


class LatentsOnly:
    """A VAE's geometry without its network: sampling here ends at latents (output_type 'latent')."""

    def __init__(self, channels, spatial_factor, temporal_factor=1):
        self.latent_channels, self.spatial_factor, self.temporal_factor = channels, spatial_factor, temporal_factor


# -------------------------------------------------------------------------------------------------- context
class Context:
    """The run's settings and what its steps share (the random text encoder)."""

    def __init__(self, args):
        self.args, self.tiny = args, args.tiny
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16
        self.out = Path(args.out_dir)
        self.assets = Path(args.assets) if args.assets else None
        self._t5 = None

    def asset(self, name, fallback=None):
        """A file or folder of --assets (what --prepare copied) when there, else its usual place (or None)."""
        if self.assets is not None and (self.assets / name).exists():
            return self.assets / name
        return None if fallback is None else Path(fallback)

    def text_encoder(self, txt_size):
        """The project's TextEncoder around one random encoder of flan-t5-xl's shape (a tiny T5 with --tiny)."""
        if self._t5 is None:
            from transformers import T5Config, T5EncoderModel

            before = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
            torch.manual_seed(1)
            with torch.device(self.device):
                model = T5EncoderModel(T5Config(**(TINY_T5 if self.tiny else FLAN_T5_XL))).to(self.dtype)
            after = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
            words = " ".join(PROMPTS + ["An image:", "A video with 16 fps:", "Noise Level 500:"]).split()
            self._t5 = (word_tokenizer(words), model, count_params(model), (after - before) / 2**30)
        tokenizer, model, _, _ = self._t5
        return TextEncoder(tokenizer, model, txt_size)

    def release_text_encoder(self):
        self._t5 = None
        reset_peak(self.device)


# ------------------------------------------------------------------------------------------- step 1: correctness
def golden_outputs(meta, t, model, device):
    """Our outputs for every tensor a golden case recorded: name -> (ours, reference, tolerance), as
    tests/test_golden.py compares them (the tolerances of ../shared/golden/README.md)."""
    g = {k: v.to(device) for k, v in t.items() if k.startswith("in.")}
    y_cfg = torch.cat([g["in.y"], g["in.y_null"]])

    def jacobi(settings, noise=None, **kwargs):
        return model.reverse(g["in.noise"] if noise is None else noise, y_cfg, guidance=meta["cfg"], jacobi=True,
                             jacobi_block_size=meta["jacobi_block_size"], **settings, **kwargs)

    z, outputs, logdets = model(g["in.x"], g["in.y"])
    out = {"forward.z": (z, t["out.forward.z"], 1e-4)}
    out.update({f"forward.outputs.{i}": (o, t[f"out.forward.outputs.{i}"], 1e-4) for i, o in enumerate(outputs)})
    out.update({f"forward.logdet.{i}": (d, t[f"out.forward.logdet.{i}"], 1e-4) for i, d in enumerate(logdets)})
    for name, value in model.get_loss(z, logdets).items():
        ref = t[f"out.forward.{name}"]
        out[f"forward.{name}"] = (value.reshape(1), ref, 1e-5 * float(ref.abs().max()))
    out["score_denoise"] = (model.score_denoise(g["in.x"], g["in.y"], 0.3), t["out.score_denoise"], 2e-4)
    out["reverse.seq"] = (model.reverse(g["in.noise"], g["in.y"]), t["out.reverse.seq"], 2e-4)
    seq_cfg = model.reverse(g["in.noise"], y_cfg, guidance=meta["cfg"])
    out["reverse.seq_cfg"] = (seq_cfg, t["out.reverse.seq_cfg"], 2e-4)
    out["reverse.jacobi_cfg"] = (jacobi(meta["jacobi"]["exact"]), t["out.reverse.jacobi_cfg"], 2e-4)
    loose = jacobi(meta["jacobi"]["loose"])
    if len(meta["x_shape"]) == 4:
        out["reverse.jacobi_cfg_th"] = (loose, t["out.reverse.jacobi_cfg_th"], 2e-4)
    else:  # another schedule on video: at least as close to the exact sample as the original's
        official_err = float((t["out.reverse.jacobi_cfg_th"] - t["out.reverse.seq_cfg"]).abs().max())
        out["reverse.jacobi_cfg_th (vs seq_cfg)"] = (loose, t["out.reverse.seq_cfg"], official_err)
    if "out.denoiser" in t:
        out["denoiser"] = (model.denoise(g["in.x"], g["in.y"]), t["out.denoiser"], 2e-4)
    if "out.reverse.i2v_cfg" in t:
        out["reverse.i2v_cfg"] = (jacobi(meta["jacobi"]["exact"], cond_frames=g["in.first_frame"]),
                                  t["out.reverse.i2v_cfg"], 2e-4)
    if meta.get("long"):
        long = meta["long"]
        out["reverse.long_cfg"] = (jacobi(meta["jacobi"]["exact"], noise=g["in.noise_long"],
                                          local_attn_window=long["local_attn_window"],
                                          context_length=long["context_length"]), t["out.reverse.long_cfg"], 2e-4)
    return out


def max_err(a, b):
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


def check_correctness(ctx, report):
    device = ctx.device
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    golden = ctx.asset("golden", os.environ.get("STARFLOW_GOLDEN", ROOT.parent / "shared" / "golden"))
    cases = sorted(golden.glob("*.json"))
    if not cases:
        raise UserError(f"no golden cases in {golden}: pass --golden, or run --prepare and carry the folder")
    for path in cases:
        meta, t = json.loads(path.read_text()), load_file(path.with_suffix(".safetensors"))
        model = Model(**meta["model_kwargs"]).eval()
        model.load_state_dict({k[len("model."):]: v for k, v in t.items() if k.startswith("model.")})
        model.to(device)
        fp32 = golden_outputs(meta, t, model, device)
        errors = {name: max_err(ours, ref) for name, (ours, ref, _) in fp32.items()}
        bad = [f"{name} {errors[name]:.2g} > {tol:.2g}" for name, (_, _, tol) in fp32.items() if errors[name] > tol]
        worst = max(errors, key=lambda n: errors[n] / max(fp32[n][2], 1e-30))
        report.add("1", f"golden {path.stem} float32 (TF32 off)", not bad,
                   "; ".join(bad) if bad else f"{len(errors)} tensors within tolerance (closest: {worst} "
                                              f"{errors[worst]:.2g} of {fp32[worst][2]:.2g})", errors=errors)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = golden_outputs(meta, t, model, device)
        vs32 = {name: max_err(bf16[name][0], fp32[name][0]) for name in fp32}
        finite = all(torch.isfinite(v[0]).all() for v in bf16.values())
        scale = {name: max(float(fp32[name][0].detach().abs().max()), 1e-30) for name in fp32}
        largest = max(vs32, key=lambda n: vs32[n] / scale[n])
        report.add("1", f"golden {path.stem} bf16 autocast", bool(finite),
                   f"max |bf16 - float32|: forward.z {vs32['forward.z']:.2g}, reverse.seq_cfg "
                   f"{vs32['reverse.seq_cfg']:.2g}, largest relative {largest} {vs32[largest]:.2g} "
                   f"(|x| up to {scale[largest]:.2g})", error_vs_float32=vs32)
    ok, summary, counts = flow_invariants(ctx)
    report.add("1", f"flow invariants (tests/test_flow.py on {device}, float32)", ok, summary, **counts)


def flow_invariants(ctx):
    """tests/test_flow.py with STARFLOW_TEST_DEVICE set to the device (a few of its tests with --tiny): (ok,
    summary, counts). Every test must run: a skip means the device was not there."""
    import pytest

    class Counts:
        def __init__(self):
            self.counts = {}

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                self.counts[report.outcome] = self.counts.get(report.outcome, 0) + 1

    args = ["-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_flow.py")]
    if ctx.tiny:
        args += ["-k", TINY_INVARIANTS]
    counter, before = Counts(), os.environ.get("STARFLOW_TEST_DEVICE")
    os.environ["STARFLOW_TEST_DEVICE"] = str(ctx.device)
    try:
        with Stopwatch(ctx.device) as clock:
            code = pytest.main(args, plugins=[counter])
    finally:
        if before is None:
            del os.environ["STARFLOW_TEST_DEVICE"]
        else:
            os.environ["STARFLOW_TEST_DEVICE"] = before
    counts = counter.counts
    ok = code == 0 and counts.get("passed", 0) > 0 and not counts.get("skipped")
    return ok, (f"{counts.get('passed', 0)} passed, {counts.get('failed', 0)} failed, {counts.get('skipped', 0)} "
                f"skipped in {clock.seconds:.0f} s"), counts


# ---------------------------------------------------------------------------------------------- sampling
def timed_sample(pipe, prompts, **settings):
    """One pipeline call with per-sample seeds, ending at latents: seconds (total and the flow's decode), network
    calls (None when compiled: a hook would enter the graph), peak memory."""
    device = pipe.device
    calls = None if settings.get("compile_decode") else FlowCalls(pipe.model.blocks)
    decode = {}

    def timed_decode(*args, **kwargs):
        with Stopwatch(device) as clock:
            x = STARFlowPipeline.decode(pipe, *args, **kwargs)
        decode["seconds"] = clock.seconds
        return x

    pipe.decode = timed_decode
    reset_peak(device)
    try:
        generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        with Stopwatch(device) as clock:
            out = pipe(prompts, num_samples=1, generator=generators, output_type="latent", **settings)
    finally:
        del pipe.decode
        if calls is not None:
            calls.close()
    return out, dict(seconds=round(clock.seconds, 3), decode_seconds=round(decode["seconds"], 3),
                     calls=None if calls is None else calls.n,
                     seconds_per_call=None if calls is None else round(decode["seconds"] / max(calls.n, 1), 5),
                     seconds_per_sample=round(clock.seconds / len(prompts), 3), peak_gib=peak_gib(device))


def load_official(path):
    """The original's transformer_flow module loaded from `path` beside ours: its `misc` package stands in for ours
    only while it imports. Never imported by the project; benchmarks only."""
    path = Path(path)
    if not (path / "transformer_flow.py").is_file():
        raise UserError(f"the original code is not in {path}: pass --official, or run --prepare and carry the folder")
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "misc" or k.startswith("misc.")}
    sys.path.insert(0, str(path))
    try:
        spec = importlib.util.spec_from_file_location("official_transformer_flow", path / "transformer_flow.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path))
        for k in [k for k in sys.modules if k == "misc" or k.startswith("misc.")]:
            del sys.modules[k]
        sys.modules.update(ours)
    return module


def official_model(module, kwargs, state, device, dtype):
    """The original Model with our weights (its deprecated buffers it computes itself)."""
    with torch.device(device):
        model = module.Model(**kwargs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or not all(DEPRECATED_KEYS.match(k) for k in missing):
        raise RuntimeError(f"the original does not take our weights: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}")
    return model.to(dtype).eval().requires_grad_(False)


def sample_3b(ctx, report):
    device, dtype = ctx.device, ctx.dtype
    cfg = load_config(str(CONFIG_3B), TINY_3B if ctx.tiny else None)
    vae = LatentsOnly(cfg.channel_size, spatial_factor=8)
    text = ctx.text_encoder(cfg.txt_size)
    kwargs = model_kwargs(cfg, cfg.img_size // vae.spatial_factor, text.dim)
    model = random_model(cfg, cfg.img_size // vae.spatial_factor, text.dim, device, dtype)
    n = count_params(model)
    _, _, t5_params, t5_gib = ctx._t5
    report.add("2", "3B T2I model (official config, bf16, random weights)", ctx.tiny or n == PARAMS["3b"],
               f"{n:,} parameters; resident with the random text encoder ({t5_params:,} parameters, "
               f"{gib(t5_gib if device.type == 'cuda' else None)}): {gib(allocated_gib(device))}", params=n,
               text_params=t5_params, text_gib=t5_gib, resident_gib=allocated_gib(device))
    pipe = STARFlowPipeline(model, text, vae, cfg, device, dtype)
    prompts, guidance = PROMPTS[:8], 3.6
    side = cfg.img_size // vae.spatial_factor
    with torch.no_grad():  # first use of every kernel, outside the timings
        model(torch.zeros(2, cfg.channel_size, side, side, device=device, dtype=dtype),
              text.encode(prompts[:2]).to(dtype))
    runs = [("sequential", dict(jacobi=False)), ("Jacobi block 16, th 1e-3", dict(jacobi=True, jacobi_block_size=16,
                                                                                 jacobi_th=1e-3, jacobi_max_iter=32)),
            ("jacobi auto", dict(jacobi="auto")), ("sequential, compiled", dict(jacobi=False, compile_decode=True))]
    ours = {}
    for name, settings in runs:
        first = timed_sample(pipe, prompts, cfg=guidance, **settings)[1] if "compile_decode" in settings else None
        out, r = timed_sample(pipe, prompts, cfg=guidance, **settings)
        ours[name] = (out.noisy_latents, r)
        (h, w) = out.size
        if first is None:
            calls = f"{r['calls']} network calls, {1e3 * r['seconds_per_call']:.2f} ms/call"
        else:  # the call after the one that compiled (float32 equality is tested on the CPU; this is bf16)
            gap = max_err(out.noisy_latents, ours["sequential"][0])
            eager = ours["sequential"][1]
            r.update(first_decode_seconds=first["decode_seconds"], max_abs_diff_to_eager=gap, calls=eager["calls"],
                     seconds_per_call=round(r["decode_seconds"] / eager["calls"], 5),  # eager's calls, compiled
                     ratio_to_eager=round(r["decode_seconds"] / eager["decode_seconds"], 3))
            calls = (f"compiled in the first call (decode {first['decode_seconds']:.1f} s), "
                     f"{r['ratio_to_eager']:.2f}x eager sequential's decode time, max |compiled - eager| {gap:.2g}")
        report.add("2", f"3B ours, {name}", True,
                   f"{r['seconds_per_sample']:.2f} s/image ({r['seconds']:.1f} s for 8 at {w}x{h}, cfg 3.6; flow "
                   f"decode {r['decode_seconds']:.1f} s), {calls}, peak {gib(r['peak_gib'])}", **r)

    # the original on the same weights, inputs and settings, after ours has left the device
    request = pipe.check_inputs(prompts, [torch.Generator().manual_seed(i) for i in range(8)], cfg=guidance,
                                output_type="latent")
    _, _, y = pipe.encode_prompt(request, None)
    noise = pipe.prepare_noise(request).to(device, dtype)
    official = official_model(load_official(ctx.official), kwargs, model.state_dict(), device, dtype)
    del pipe, model
    reset_peak(device)
    with one_rank_group(device), torch.no_grad():
        for name, settings in runs[:2]:
            calls = FlowCalls(official.blocks)
            reset_peak(device)
            with Stopwatch(device) as clock:
                x = official.reverse(noise, y, guidance=guidance, **settings)
            calls.close()
            mine, r = ours[name]
            diff = max_err(x, mine)
            report.add("2", f"3B original, {name}", True,
                       f"flow decode {clock.seconds:.1f} s, {calls.n} network calls, peak {gib(peak_gib(device))}; "
                       f"ours/original {r['decode_seconds'] / clock.seconds:.2f}, max |ours - original| {diff:.2g} "
                       f"(bf16)", seconds=round(clock.seconds, 3), calls=calls.n, peak_gib=peak_gib(device),
                       ratio_ours_over_original=round(r["decode_seconds"] / clock.seconds, 3), max_abs_diff=diff)
    del official


def sample_7b(ctx, report):
    device, dtype = ctx.device, ctx.dtype
    cfg = load_config(str(CONFIG_7B), TINY_7B if ctx.tiny else None)
    vae = LatentsOnly(cfg.channel_size, spatial_factor=16, temporal_factor=4)
    text = ctx.text_encoder(cfg.txt_size)
    model = random_model(cfg, cfg.img_size // vae.spatial_factor, text.dim, device, dtype)
    n = count_params(model)
    report.add("3", "7B T2V model (official config, bf16, random weights)", ctx.tiny or n == PARAMS["7b"],
               f"{n:,} parameters", params=n)
    pipe = STARFlowPipeline(model, text, vae, cfg, device, dtype)
    out, r = timed_sample(pipe, PROMPTS[:1], target_length=17, aspect_ratio="16:9", jacobi=True,
                          jacobi_block_size=32, jacobi_th=1e-3, jacobi_max_iter=32)
    (h, w), (_, frames, _, lh, lw) = out.size, out.latents.shape
    tokens, tokens_81 = frames * lh * lw, pipe.latent_frames(81) * lh * lw
    extrapolated = r["seconds"] * tokens_81 / tokens
    report.add("3", "7B ours, 17 frames 480p, Jacobi block 32, th 1e-3", True,
               f"{r['seconds']:.1f} s for {w}x{h} ({frames} latent frames, {tokens} tokens, cfg "
               f"{guidance_scale(cfg):g}; flow decode {r['decode_seconds']:.1f} s, learned denoiser the rest), "
               f"{r['calls']} network calls, peak {gib(r['peak_gib'])}; 81 frames ({tokens_81} tokens) "
               f"extrapolated by token count: about "
               f"{extrapolated:.0f} s, an extrapolation, not a measurement (attention over the longer context costs "
               f"more)", **r, width=w, height=h, tokens=tokens, tokens_81=tokens_81,
               extrapolated_81_frame_seconds=round(extrapolated, 1))


# ---------------------------------------------------------------------------------------------- training
class SyntheticRun(Run):
    """train.py's Run (setup_model, micro_step, optimizer_step as they are) fed random latents and text states
    instead of a data loader and frozen encoders."""

    def __init__(self, cfg, info, txt_dim, spatial_factor):
        self.cfg, self.info, self.main, self.cuda = cfg, info, True, info.device.type == "cuda"
        self.seed, self.secondary, self.skipped_files = 0, None, set()
        self.step, self.skipped_steps = 0, 0
        self.text_encoder, self.vae = SimpleNamespace(dim=txt_dim), LatentsOnly(cfg.channel_size, spatial_factor)
        with torch.device(info.device):  # build the float32 model where it trains
            self.setup_model()
        self.schedules = {"model": T.WarmupCosine(self.optimizers["model"], 0, 10**6, cfg.lr, cfg.min_lr)}
        self.micro_peak = 0

    def encode_pixels(self, pixels, meta):
        return pixels

    def encode_text(self, captions, meta, gen):
        return meta["text"]

    def micro_step(self, batch, index, sync):
        """The micro step as train.py runs it; also records its own memory peak (forward and backward)."""
        if self.cuda:  # only the counter: no collection or cache release inside a timed step
            torch.cuda.reset_peak_memory_stats(self.info.device)
        losses = super().micro_step(batch, index, sync)
        self.micro_peak = torch.cuda.max_memory_allocated(self.info.device) if self.cuda else 0
        return losses

    def batch(self, n, latent_shape, text_shape):
        device = self.info.device
        x = torch.randn(n, *latent_shape, device=device)
        meta = dict(skipped=[], key=[str(i) for i in range(n)], text=torch.randn(n, *text_shape, device=device))
        return x, [""] * n, meta


def is_oom(error):
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def try_step(run, n, shapes):
    """One optimizer step at batch n: (seconds, peak bytes of the step, peak bytes of its micro step), or None when
    it does not fit (the failed step's memory is released; the run should be rebuilt before it is timed)."""
    device = run.info.device
    try:
        reset_peak(device)
        with Stopwatch(device) as clock:
            metrics = run.optimizer_step([run.batch(n, *shapes)], run.step)
        if not math.isfinite(metrics["loss"]):
            raise RuntimeError(f"non-finite loss at batch {n}")
        return clock.seconds, torch.cuda.max_memory_allocated(device) if run.cuda else 0, run.micro_peak
    except RuntimeError as e:
        if not is_oom(e):
            raise
    # out of the handler, so that the failed step's frames (and their tensors) are gone
    for opt in run.optimizers.values():
        opt.zero_grad(set_to_none=True)
    for module in run.model.modules():
        if hasattr(module, "reshard"):
            module.reshard()
    reset_peak(device)
    return None


def largest_batch(fits, capacity, max_batch, tries=6):
    """(largest batch <= max_batch found to fit, smallest found not to or None); fits(b) returns the micro step's
    peak bytes, or None when b does not fit. The peaks at 2 and 4 give the bytes per sample and so a first guess,
    then steps of 10% find the edge and halving closes it, `tries` more steps at most. Without a capacity (the CPU)
    max_batch is taken as it is."""
    small = {b: fits(b) for b in (2, 4) if b <= max_batch}
    if any(v is None for v in small.values()):
        raise RuntimeError(f"batch {min(b for b, v in small.items() if v is None)} does not fit")
    if capacity is None or len(small) < 2:
        guess = max_batch
    else:
        per_sample = max((small[4] - small[2]) / 2, 1.0)
        guess = int((0.97 * capacity - (small[2] - 2 * per_sample)) / per_sample)
    good, bad, first_failure = max(small, default=1), None, False
    b = min(max(guess, good), max_batch)
    for _ in range(tries):
        if b != good:
            if fits(b) is None:
                first_failure, bad = bad is None, b
            else:
                good = b
        if bad is None:
            if good == max_batch:
                break
            b = min(max_batch, max(good + 1, int(good * 1.1)))
        elif bad - good <= 1:
            break
        else:  # just under the first failure (the guess is usually close), then halve the gap
            b = int(bad / 1.1) if first_failure and good < int(bad / 1.1) else (good + bad) // 2
            first_failure = False
    return good, bad


def train_3b(ctx, report):
    device = ctx.device
    ctx.release_text_encoder()
    with one_rank_group(device):
        for checkpointing in (0, 1):
            train_setting(ctx, report, checkpointing)


def train_setting(ctx, report, checkpointing):
    """The largest batch with gradient checkpointing on or off, then timed steps at it on a fresh run."""
    device = ctx.device
    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    max_batch = ctx.args.max_batch or (4 if ctx.tiny else 512)
    overrides = dict(TINY_3B if ctx.tiny else {}, acc=1, fsdp=1, train_seed=0, gradient_checkpoint=checkpointing,
                     gradient_checkpoint_mlp=checkpointing)
    cfg = load_config(str(CONFIG_3B), overrides)
    txt_dim = TINY_T5["d_model"] if ctx.tiny else FLAN_T5_XL["d_model"]
    side = cfg.img_size // 8
    shapes = ((cfg.channel_size, side, side), (cfg.txt_size, txt_dim))
    info = DistInfo(0, 1, 0, device)
    run = SyntheticRun(cfg, info, txt_dim, spatial_factor=8)
    params = sum(p.numel() for p in run.flow_params + run.denoiser_params)
    if try_step(run, 1, shapes) is None:  # creates the optimizer state
        raise RuntimeError("batch 1 does not fit")
    b, bad = largest_batch(lambda n: (r := try_step(run, n, shapes)) and r[2], capacity, max_batch)
    if bad is not None:  # a step ran out of memory: time the batch on a run that never did
        del run
        reset_peak(device)
        run = SyntheticRun(cfg, info, txt_dim, spatial_factor=8)
    steps = [try_step(run, b, shapes) for _ in range(1 + (ctx.args.train_steps or (1 if ctx.tiny else 3)))][1:]
    if any(s is None for s in steps):
        raise RuntimeError(f"batch {b} stopped fitting while it was timed")
    seconds = float(np.median([s[0] for s in steps]))
    peak = round(max(s[1] for s in steps) / 2**30, 2) if run.cuda else None
    tokens = b * side * side
    mfu = 6 * params * tokens / seconds / PEAK_BF16_FLOPS if run.cuda else None
    precision = "bf16" if run.cuda else "float32 (train.py's precision on a CPU)"
    edge = "the --max_batch cap" if b == max_batch else f"{bad} did not fit" if bad else "the search's end"
    report.add("4", f"3B training, FSDP2 on 1 {device.type}, {precision}, {'with' if checkpointing else 'without'} "
                    f"gradient checkpointing", True,
               f"largest batch {b} ({edge}): {seconds:.2f} s/step, {b / seconds:.1f} images/s, peak {gib(peak)}, MFU "
               f"{'n/a on cpu' if mfu is None else f'{100 * mfu:.1f}%'} (6 x {params / 1e9:.2f}B params x {tokens} "
               f"latent tokens per step over {PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s)",
               batch=b, first_batch_not_fitting=bad, seconds_per_step=round(seconds, 3),
               images_per_second=round(b / seconds, 2), peak_gib=peak, mfu=mfu and round(mfu, 4), params=params)
    del run
    reset_peak(device)


# ------------------------------------------------------------------------------------------- demo sample.py
def digit_classifier(ctx, size):
    """bench/demo_quality.py's digit CNN: the one --prepare trained, or one trained here (2 epochs on 10000 digits
    with --tiny, about 87% right on the test split: enough to compare the two runs)."""
    path = ctx.asset("digit_classifier.safetensors")
    net = demo_quality.digit_net(size)
    if path is not None:
        net.load_state_dict(load_file(path))
        return net.eval(), str(path)
    net, acc, _ = demo_quality.train_classifier(size, 2 if ctx.tiny else 3, 0, limit=10000 if ctx.tiny else None)
    return net, f"trained here (test-split digit accuracy {acc:.1%})"


def read_samples(folder):
    files = sorted(Path(folder).glob("*_[0-9][0-9][0-9][0-9].png"))
    return torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255
                        for f in files])


def check_demo(ctx, report):
    config = load_config(str(DEMO / "config.yaml"))
    per_combo = 1 if ctx.tiny else 2
    colours = demo_quality.COLOUR_NAMES[:2] if ctx.tiny else demo_quality.COLOUR_NAMES
    prompts = demo_quality.prompts_for([(d, c) for d in range(10) for c in colours], per_combo)
    text = ctx.asset("minilm")
    extra = [] if text is None else ["--text", str(text)]
    images, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        captions = Path(tmp) / "prompts.txt"
        captions.write_text("\n".join(p for _, _, p in prompts) + "\n")
        for name, device, dtype in (("device_bf16", ctx.device, "bfloat16"), ("cpu_float32", "cpu", "float32")):
            folder = Path(tmp) / name
            argv = ["--checkpoint_path", str(DEMO), "--caption", str(captions), "--device", str(device), "--dtype",
                    dtype, "--output_dir", str(folder), "--seed", "0", "--sample_batch_size", str(len(prompts))]
            with Stopwatch(torch.device(device)) as clock:
                sample.main(argv + extra)
            images[name], seconds[name] = read_samples(folder), clock.seconds
    net, source = digit_classifier(ctx, config.img_size)
    with torch.no_grad():
        digits = {k: net(demo_quality.ink(v)).argmax(1) for k, v in images.items()}
    wanted = torch.tensor([d for d, _, _ in prompts])
    acc = {k: float((v == wanted).float().mean()) for k, v in digits.items()}
    agree = float((digits["device_bf16"] == digits["cpu_float32"]).float().mean())
    pixel = float((images["device_bf16"] - images["cpu_float32"]).abs().mean())
    grid = torch.cat([torch.cat(list(images[k][:20]), 2) for k in ("cpu_float32", "device_bf16")], 1)
    grid = grid.repeat_interleave(4, 1).repeat_interleave(4, 2)  # 16-pixel digits, enlarged to be seen
    write_png(ctx.out / "demo_bf16_vs_fp32.png", (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    ok = agree >= 0.9 and acc["device_bf16"] >= acc["cpu_float32"] - 0.05
    report.add("5", f"sample.py on the demo checkpoint, bf16 on {ctx.device} vs float32 on cpu", ok,
               f"{len(prompts)} prompts: prompted digit read in {acc['device_bf16']:.0%} (bf16) and "
               f"{acc['cpu_float32']:.0%} (float32), same digit in {agree:.0%} of pairs, mean |pixel gap| {pixel:.3f}; "
               f"{seconds['device_bf16']:.1f} s and {seconds['cpu_float32']:.1f} s; classifier {source}; "
               f"picture: demo_bf16_vs_fp32.png (top float32, bottom bf16)",
               accuracy=acc, agreement=agree, mean_pixel_gap=pixel, seconds=seconds)


def pixel_errors(pictures, others):
    """(largest, mean) |pixel difference| over pairs of PIL pictures, in 8-bit levels."""
    gaps = [np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)) for a, b in zip(pictures, others)]
    return int(max(g.max() for g in gaps)), float(np.mean([g.mean() for g in gaps]))


def check_inversion(ctx, report):
    """What only an invertible model does, run on the device: demo samples come back from an edit to their own
    prompt (guidance 0 and 3) and from the ends of an interpolation, with no added noise; inpainting keeps every
    pixel outside its mask. float32 (TF32 off) must give the pixels back (a level at most, for kernels that round
    differently); bf16 may cost up to 2 levels on average (on a CPU: 0.1 to 0.6)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    text = ctx.asset("minilm")
    prompts = ["a red seven", "a blue two"]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(len(prompts))]  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        mask = Path(tmp) / "lower_half.png"
        size = load_config(str(DEMO / "config.yaml")).img_size
        Image.fromarray(np.kron(np.array([[0], [255]], np.uint8), np.ones((size // 2, size), np.uint8))).save(mask)
        for dtype, largest_allowed, mean_allowed in (("float32", 1, 0.05), ("bfloat16", None, 2.0)):
            pipe = STARFlowPipeline.from_pretrained(DEMO, device=ctx.device, dtype=dtype,
                                                    overrides=None if text is None else {"text": str(text)})
            with Stopwatch(ctx.device) as clock:
                pictures = pipe(prompts, cfg=3.0, generator=gens()).images
                errors = {f"edit_cfg_{w:g}": pixel_errors(pictures, pipe.edit(
                    pictures, prompts, source_prompt=prompts, cfg=w, noise_std=0, generator=gens()).images)
                    for w in (0.0, 3.0)}
                path = pipe.interpolate(pictures, "", steps=3, cfg=0.0, noise_std=0).images
                errors["interpolation_ends"] = pixel_errors(pictures, path[::2])
                filled = pipe.inpaint(pictures[0], mask, "a red one", rounds=1, candidates=2,
                                      generator=torch.Generator().manual_seed(0)).images[0]
                errors["inpainting_kept_half"] = pixel_errors([pictures[0].crop((0, 0, size, size // 2))],
                                                              [filled.crop((0, 0, size, size // 2))])
            largest = max(e[0] for e in errors.values())
            mean = max(e[1] for k, e in errors.items() if k != "inpainting_kept_half")
            ok = errors["inpainting_kept_half"][0] == 0 and mean <= mean_allowed and \
                (largest_allowed is None or largest <= largest_allowed)
            words = ", ".join(f"{k} {e[0]} / {e[1]:.3f}" for k, e in errors.items())
            report.add("6", f"inversion on {ctx.device}, {dtype}", ok,
                       f"largest / mean pixel error (8-bit levels): {words}; {clock.seconds:.1f} s",
                       errors={k: {"largest": e[0], "mean": round(e[1], 4)} for k, e in errors.items()},
                       seconds=clock.seconds)


# ------------------------------------------------------------------------------------------------ memory plan
def memory_plan():
    """Memory to sample and to train the 3B and 7B models, computed (not measured) from exact parameter counts on
    the meta device and the deep step's KV cache, in the dtypes the code uses: the flow in bf16 and the text encoder
    in bf16 for sampling on CUDA, the VAE in float32; for training 16 bytes per flow parameter (float32 weights,
    gradients and AdamW's two moments) and the frozen encoders in float32. Activations are not in it: the score
    step's backward pass and training's forward/backward (step 4 of the check measures the training peak)."""
    from diffusers import AutoencoderKL, AutoencoderKLWan
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        t5 = count_params(T5EncoderModel(T5Config(**FLAN_T5_XL)))
        vaes = {"3B": count_params(AutoencoderKL(**SD_VAE)), "7B": count_params(AutoencoderKLWan(**WAN22_VAE))}
    sampling, training = [], []
    for key, path, spatial, temporal in (("3B", CONFIG_3B, 8, 1), ("7B", CONFIG_7B, 16, 4)):
        cfg = load_config(str(path))
        with torch.device("meta"):
            model = Model(**model_kwargs(cfg, cfg.img_size // spatial, FLAN_T5_XL["d_model"]))
        flow = count_params(model)
        top = model.blocks[-1]
        attn = top.attn_blocks[0].attention
        if key == "3B":
            cases = [("8 images, 256x256", 8, 32 * 32)]
        else:  # 480p at img_size 640: 848x480 pixels, 53x30 latents per frame
            cases = [(f"1 clip, {f} frames 848x480", 1, ((f - 1) // temporal + 1) * (480 // spatial) * (848 // spatial))
                     for f in (17, 81)]
        for what, batch, tokens in cases:  # guidance doubles the rows; keys and values of every deep-step layer
            kv = 2 * len(top.attn_blocks) * 2 * batch * attn.num_kv_heads * (cfg.txt_size + tokens) * attn.head_dim * 2
            sampling.append(dict(model=key, sample=what + ", guidance", flow=flow, vae=vaes[key], text=t5,
                                 flow_gib=2 * flow / 2**30, vae_gib=4 * vaes[key] / 2**30, text_gib=2 * t5 / 2**30,
                                 kv_gib=kv / 2**30))
        training.append(dict(model=key, flow=flow, state_gib=16 * flow / 2**30, text_gib=4 * t5 / 2**30,
                             vae_gib=4 * vaes[key] / 2**30))
    return sampling, training


def print_plan():
    sampling, training = memory_plan()
    print("Sampling (bf16 flow, bf16 text encoder, float32 VAE; activations of the score step not included):\n")
    print("| model | sample | flow weights | VAE | deep-step KV cache | text encoder | total without / with the text "
          "encoder on the GPU |")
    print("|---|---|---|---|---|---|---|")
    for r in sampling:
        base = r["flow_gib"] + r["vae_gib"] + r["kv_gib"]
        print(f"| {r['model']} ({r['flow']:,} parameters) | {r['sample']} | {r['flow_gib']:.1f} GiB | "
              f"{r['vae_gib']:.1f} GiB ({r['vae']:,}) | {r['kv_gib']:.1f} GiB | {r['text_gib']:.1f} GiB "
              f"({r['text']:,}) | {base:.1f} / {base + r['text_gib']:.1f} GiB |")
    print("\nTraining (FSDP2 shards the state and, with fsdp_text_encoder 1, the text encoder; the VAE is replicated; "
          "activations not included):\n")
    print("| model | state: float32 weights, grads, AdamW | frozen text encoder (float32) | VAE (float32) | per GPU "
          "over 1 / 8 / 32 GPUs, without / with the text encoder |")
    print("|---|---|---|---|---|")
    for r in training:
        per = [f"{r['state_gib'] / n + r['vae_gib']:.1f} / {(r['state_gib'] + r['text_gib']) / n + r['vae_gib']:.1f}"
               for n in (1, 8, 32)]
        print(f"| {r['model']} | {r['state_gib']:.1f} GiB | {r['text_gib']:.1f} GiB | {r['vae_gib']:.1f} GiB | "
              f"{' ; '.join(per)} GiB |")


# ----------------------------------------------------------------------------------------------- prepare
def prepare(folder):
    """Copy what the GPU machine lacks into `folder` (an ignored folder of the checkout, named in `carry`): the
    original code and the golden cases (../shared does not travel), all-MiniLM-L6-v2 in float16 (its wheel is too big
    to carry) and the demo's digit classifier (MNIST is not there)."""
    folder = Path(folder)
    shared = ROOT.parent / "shared"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(shared / "reference" / "official", folder / "official",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(shared / "golden", folder / "golden", ignore=shutil.ignore_patterns("*.md"))
    from utils.text_encoder import packaged_path

    minilm = Path(packaged_path("sentence-transformers/all-MiniLM-L6-v2"))
    shutil.copytree(minilm, folder / "minilm", ignore=shutil.ignore_patterns("model.safetensors", "1_Pooling"))
    save_file({k: v.half() for k, v in load_file(minilm / "model.safetensors").items()},
              str(folder / "minilm" / "model.safetensors"))
    size = load_config(str(DEMO / "config.yaml")).img_size
    net, acc, _ = demo_quality.train_classifier(size, 3, 0)
    save_file(net.state_dict(), str(folder / "digit_classifier.safetensors"))
    for path in [folder, *folder.rglob("*")]:  # ../shared is read-only; the copy must be replaceable
        path.chmod(0o755 if path.is_dir() else 0o644)
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"wrote {folder} ({total / 2**20:.1f} MiB; classifier test-split digit accuracy {acc:.1%})")


# ------------------------------------------------------------------------------------------------------ main
STEPS = {"1": ("correctness", check_correctness), "2": ("3B sampling", sample_3b), "3": ("7B sampling", sample_7b),
         "4": ("3B training", train_3b), "5": ("demo sample.py", check_demo), "6": ("inversion", check_inversion)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny stand-ins for the 3B and 7B models (CPU, CI)")
    parser.add_argument("--out_dir", default=os.environ.get("OUT"), help="report folder (default $OUT)")
    parser.add_argument("--steps", default="1,2,3,4,5,6", help="which steps to run, e.g. 2,4")
    parser.add_argument("--assets", default=str(ROOT / "gpu_assets") if (ROOT / "gpu_assets").is_dir() else None,
                        help="the folder --prepare wrote (default gpu_assets/ when present)")
    parser.add_argument("--official", default=None, help="the original code (default <assets>/official, else "
                                                         "../shared/reference/official)")
    parser.add_argument("--max_batch", type=int, default=None, help="training search cap (default 512; 4 --tiny)")
    parser.add_argument("--train_steps", type=int, default=None, help="timed training steps at the batch found "
                                                                      "(default 3; 1 with --tiny)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default torch's; 1 with --tiny)")
    parser.add_argument("--prepare", metavar="FOLDER", help="write the assets folder for the GPU machine and stop")
    parser.add_argument("--plan", action="store_true", help="print the computed memory table and stop")
    return run_cli(run, parser.parse_args(argv))


def run(args):
    if args.prepare:
        return prepare(args.prepare)
    if args.plan:
        return print_plan()
    if not args.out_dir:
        raise UserError("no report folder: pass --out_dir FOLDER (or set $OUT)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device; use --device cpu --tiny here")
    if device.type == "cuda":  # an index: NCCL and the memory counters want this GPU, not "the current one"
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
        args.device = str(device)
    torch.set_num_threads(args.threads or (1 if args.tiny else torch.get_num_threads()))
    ctx = Context(args)
    ctx.official = args.official or ctx.asset("official", ROOT.parent / "shared" / "reference" / "official")
    os.makedirs(ctx.out, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = Report(ctx.out, dict(device=str(device), device_name=name, tiny=args.tiny, torch=torch.__version__,
                                  date=datetime.date.today().isoformat(), steps=args.steps))
    print(f"GPU check on {name} ({device}), torch {torch.__version__}{', tiny stand-ins' if args.tiny else ''}")
    start = time.perf_counter()
    for number in args.steps.split(","):
        title, step = STEPS[number.strip()]
        with Stopwatch(device) as clock:
            try:
                step(ctx, report)
            except Exception as e:  # one broken step must not hide the others' results
                traceback.print_exc()
                message = str(e).strip().splitlines()[0] if str(e).strip() else ""
                report.add(number, f"{title} did not finish", False, f"{type(e).__name__}: {message}"[:300])
        reset_peak(device)
        print(f"[{number}] {title}: {clock.seconds:.0f} s", flush=True)
    print(f"done in {time.perf_counter() - start:.0f} s, {report.failures} failure(s); "
          f"report in {ctx.out}/gpu_check.md")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
