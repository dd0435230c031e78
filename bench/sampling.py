"""Decoding schedules side by side: network calls, token evaluations, wall time and the gap to sequential decoding,
per schedule and per flow step, from one run.

    python bench/sampling.py                             # both models, 2 threads
    python bench/sampling.py --models demo --fid_samples 1000

Models: `bench`, a 256-wide deep-shallow STARFlow (layers 2 2 2 2 2 8, random weights with small non-zero output
heads, as ../shared/tools/compare_official draws them) on 16x16x4 latents, batch 4 with guidance 3; `demo`, the
shipped checkpoints/demo_mnist_t2i (64 tokens of pixels, layers 1 1 4), 16 prompts with guidance 3.
A network call is one pass of a flow step's transformer (what a GPU pays: latency); a token evaluation is one
token through it (what a CPU pays: arithmetic); both counted per flow step. The gap to sequential decoding is the
largest and the mean absolute difference of the samples (before denoising). With --fid_samples N, the demo's
samples of every schedule go through evaluate.py's FID protocol: FID against the sequential samples of the same
seeds, and against the tinted MNIST test digits. The compiled rows decode the token-by-token steps through
torch.compile'd graphs (sample.py --compile_decode 1), timed after a first run that compiles; they evaluate what
their eager twins do, counted there. For the demo, a whole pipeline call (sample.py's defaults) is then timed
step by step: text encoding, decoding, denoising, VAE decoding. Prints tables, writes <out_dir>/sampling.json.
"""
import argparse
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the demo benchmarks' helpers
from transformer_flow import MetaBlock, Model  # noqa: E402
from utils.errors import run_cli  # noqa: E402

SCHEDULES = {
    "sequential": {},
    "jacobi block 16, th 1e-3 (original)": dict(jacobi=True, jacobi_block_size=16, jacobi_th=1e-3, jacobi_max_iter=32),
    "jacobi block 64, th 5e-3 (original)": dict(jacobi=True, jacobi_block_size=64, jacobi_th=5e-3, jacobi_max_iter=32),
    "auto": dict(jacobi="auto"),
    "auto, an accelerator's choice": dict(jacobi="auto"),  # the deep step's window, timed here on this device
    "sequential, compiled": dict(compile_decode=True),
    "auto, compiled": dict(jacobi="auto", compile_decode=True),
}
ACCELERATOR_CHOICE = "auto, an accelerator's choice"
# a compiled schedule evaluates what its eager twin does (counted there: counting inside a graph is not possible)
EAGER_TWIN = {"sequential, compiled": "sequential", "auto, compiled": "auto"}
BENCH_MODEL = dict(in_channels=4, img_size=16, patch_size=1, channels=256, num_blocks=6,
                   layers_per_block=[2, 2, 2, 2, 2, 8], head_dim=64, rope=True, sos=True, txt_size=16, txt_dim=384,
                   cond_top_only=True, use_softplus=True, use_final_norm=True, soft_clip=4.0, seq_order="L2R")


def bench_inputs(device):
    """The bench model with compare_official's random weights, its noise and guided text states."""
    g = torch.Generator().manual_seed(0)
    model = Model(**BENCH_MODEL)
    with torch.no_grad():
        for p in model.parameters():
            ones = p.dim() == 1 and bool(torch.all(p == 1))
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 + (1.0 if ones else 0.0))
    noise = torch.randn(4, 4, 16, 16, generator=g)
    text = torch.randn(1, 16, 384, generator=g)
    y = torch.cat([text.expand(4, -1, -1), torch.zeros(4, 16, 384)])
    return model.eval().to(device), noise.to(device), y.to(device)


DEMO_PROMPTS = [f"a {c} {d}" for d, c in zip(["seven", "three", "one", "zero"] * 4,
                                              ["red", "green", "blue", "white"] * 4)]
PIPELINE_STAGES = ["encode_prompt", "decode", "denoise", "postprocess"]  # STARFlowPipeline.__call__'s timed steps


def demo_inputs(device, checkpoint):
    from utils import recipe
    from utils.pipeline import STARFlowPipeline
    pipe = STARFlowPipeline.from_pretrained(checkpoint, device=device)
    y = torch.cat([pipe.encode_text([recipe.decorate_prompt(pipe.config, p) for p in DEMO_PROMPTS]),
                   pipe.encode_text([recipe.null_prompt(pipe.config)] * len(DEMO_PROMPTS))])
    c = pipe.config
    noise = torch.randn(len(DEMO_PROMPTS), c.channel_size, c.img_size, c.img_size,
                        generator=torch.Generator().manual_seed(1))
    return pipe.model, noise.to(device), y, pipe


class StepCounter:
    """Counts network calls and token evaluations of each flow step while decoding."""

    def __init__(self, model):
        self.blocks = [b for b in model.blocks if isinstance(b, MetaBlock)]
        self.counts = {}

    def __enter__(self):
        self.original, counts = MetaBlock.step, self.counts

        def counted(block, u, *args, **kwargs):
            calls, tokens = counts.get(id(block), (0, 0))
            counts[id(block)] = (calls + 1, tokens + u.shape[1])
            return self.original(block, u, *args, **kwargs)

        MetaBlock.step = counted
        return self

    def __exit__(self, *exc):
        MetaBlock.step = self.original

    def per_block(self):
        return [self.counts.get(id(b), (0, 0)) for b in self.blocks]


@contextmanager
def chosen_as(kind):
    """Within it, --jacobi auto picks what it picks on `kind` ('accelerator' or 'cpu'; None: this device's own)."""
    import transformer_flow
    auto_kind = transformer_flow.auto_kind
    if kind is not None:
        transformer_flow.auto_kind = lambda device: kind
    try:
        yield
    finally:
        transformer_flow.auto_kind = auto_kind


def device_kind(schedule):
    return "accelerator" if schedule == ACCELERATOR_CHOICE else None


def decode(model, noise, y, settings, kind=None):
    """One guided decode: (samples, seconds, [(calls, token evaluations)] per flow step, or None when compiled);
    kind forces --jacobi auto's device choice."""
    sync = torch.cuda.synchronize if noise.is_cuda else (lambda: None)
    compiled = settings.get("compile_decode", False)
    with chosen_as(kind), (nullcontext() if compiled else StepCounter(model)) as counter:
        sync()
        start = time.perf_counter()
        out = model.reverse(noise, y, guidance=3.0, **settings)
        sync()
        seconds = time.perf_counter() - start
    return out, seconds, None if compiled else counter.per_block()


def compare(name, model, noise, y, reps):
    """Every schedule on one model: the median of `reps` timed runs after a warm-up (a compiled schedule's first
    run, which compiles, is its warm-up: first_seconds); counts and gaps."""
    decode(model, noise[:1], torch.cat([y[:1], y[len(noise):len(noise) + 1]]), {})  # warm-up
    rows, reference = [], None
    for schedule, settings in SCHEDULES.items():
        first = decode(model, noise, y, settings)[1] if schedule in EAGER_TWIN else None
        runs = [decode(model, noise, y, settings, device_kind(schedule)) for _ in range(reps)]
        out, _, per_block = runs[0]
        if per_block is None:
            per_block = next(r["per_block"] for r in rows if r["schedule"] == EAGER_TWIN[schedule])
        seconds = sorted(r[1] for r in runs)[len(runs) // 2]
        reference = out if reference is None else reference
        rows.append(dict(schedule=schedule, seconds=seconds, calls=sum(c for c, _ in per_block),
                         evaluations=sum(t for _, t in per_block), per_block=per_block,
                         max_gap=float((out - reference).abs().max()), mean_gap=float((out - reference).abs().mean()),
                         first_seconds=first))
    seq = rows[0]
    print(f"\n{name}: {noise.shape[0]} samples, {seq['evaluations'] // len(seq['per_block'])} tokens a flow step, "
          f"{len(seq['per_block'])} steps, guidance 3")
    print(f"{'schedule':<38}{'calls':>7}{'evals':>8}{'seconds':>9}{'speed-up':>9}{'max gap':>9}{'mean gap':>10}"
          f"  per step (calls/evals, data side first)")
    for r in rows:
        r["speed_up"] = seq["seconds"] / r["seconds"]
        steps = " ".join(f"{c}/{t}" for c, t in r["per_block"])
        print(f"{r['schedule']:<38}{r['calls']:>7}{r['evaluations']:>8}{r['seconds']:>9.2f}{r['speed_up']:>9.2f}"
              f"{r['max_gap']:>9.2e}{r['mean_gap']:>10.2e}  {steps}")
    for r in rows:
        if r["first_seconds"] is not None:
            print(f"{r['schedule']}: its first run, which compiles, took {r['first_seconds']:.1f} s")
    original = rows[1]
    for auto in (r for r in rows if r["schedule"].startswith("auto")):
        print(f"{auto['schedule']} against the original's schedule: {original['calls'] / auto['calls']:.2f}x fewer "
              f"calls; {auto['evaluations'] / seq['evaluations']:.2f}x the token evaluations of sequential decoding; "
              f"{auto['speed_up']:.2f}x the speed of sequential decoding")
    return rows


def pipeline_stages(pipe, reps):
    """Where a whole demo pipeline call (sample.py's defaults: auto decoding, the config's score-denoising steps)
    spends its time: the median milliseconds of each named step over `reps` calls after a warm-up."""
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    times = {stage: [] for stage in PIPELINE_STAGES + ["total"]}

    def timed(stage, step):
        def run_step(*args, **kwargs):
            sync()
            start = time.perf_counter()
            out = step(*args, **kwargs)
            sync()
            times[stage].append(time.perf_counter() - start)
            return out
        return run_step

    for stage in PIPELINE_STAGES:  # instance attributes shadow the class's methods for this pipeline only
        setattr(pipe, stage, timed(stage, getattr(pipe, stage)))
    call = timed("total", pipe.__call__)
    try:
        for _ in range(reps + 1):
            out = call(DEMO_PROMPTS, cfg=3.0, jacobi="auto", output_type="np",
                       generator=torch.Generator().manual_seed(0))
    finally:
        for stage in PIPELINE_STAGES:
            delattr(pipe, stage)
    ms = {stage: 1e3 * sorted(t[1:])[len(t[1:]) // 2] for stage, t in times.items()}
    denoiser = f"{pipe.config.score_denoise_steps} score steps" if out.denoiser == "score" else out.denoiser
    print(f"\ndemo pipeline call: {len(DEMO_PROMPTS)} prompts ({len(set(DEMO_PROMPTS))} distinct), cfg 3, auto "
          f"decoding, denoiser: {denoiser}; median of {reps} calls")
    for stage, value in ms.items():
        print(f"{stage:<16}{value:>9.1f} ms{100 * value / ms['total']:>7.0f}%")
    return ms


def fid_rows(pipe, samples, batch, seed):
    """FID of every schedule's demo samples against the sequential ones of the same seeds and against the test
    digits (evaluate.py's protocol)."""
    from demo_eval import fid_prompts, test_digits  # noqa: E402
    from utils.metrics import InceptionV3, feature_stats, frechet_distance, inception_features
    net = InceptionV3()
    prompts = [p for _, _, p in fid_prompts(samples)]
    ref = feature_stats(inception_features(net, test_digits(pipe.config, 0, samples, seed), batch, desc="test digits"))
    feats, rows = {}, []
    for schedule, settings in SCHEDULES.items():
        images = []
        for first in range(0, samples, batch):
            chunk = prompts[first:first + batch]
            with chosen_as(device_kind(schedule)):
                out = pipe(chunk, cfg=3.0, output_type="np", **settings,
                           generator=[torch.Generator().manual_seed(seed + first + i) for i in range(len(chunk))])
            images += list(out.images)
        feats[schedule] = feature_stats(inception_features(net, images, batch, desc=schedule))
        seq = feats["sequential"]
        rows.append(dict(schedule=schedule, fid_to_sequential=frechet_distance(*feats[schedule], *seq),
                         fid_to_test_digits=frechet_distance(*feats[schedule], *ref)))
    print(f"\nFID, demo, {samples} samples per schedule (cfg 3; seeds {seed}..{seed + samples - 1}), against the "
          f"sequential samples and against {samples} tinted test digits:")
    print(f"{'schedule':<38}{'to sequential':>14}{'to test digits':>16}")
    for r in rows:
        print(f"{r['schedule']:<38}{r['fid_to_sequential']:>14.2f}{r['fid_to_test_digits']:>16.2f}")
    return rows


def run(args):
    from demo_quality import start_process
    from utils.files import write_json
    start_process(args.threads)
    report = {"threads": args.threads, "device": args.device, "reps": args.reps, "schedules": SCHEDULES}
    for name in args.models:
        if name == "bench":
            model, noise, y = bench_inputs(args.device)
        else:
            model, noise, y, pipe = demo_inputs(args.device, args.checkpoint_path)
        with torch.no_grad():
            report[name] = compare(name, model, noise, y, args.reps)
        if name == "demo":
            report["demo_pipeline_ms"] = pipeline_stages(pipe, args.reps)
        if name == "demo" and args.fid_samples:
            report["demo_fid"] = fid_rows(pipe, args.fid_samples, args.fid_batch, args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(os.path.join(args.out_dir, "sampling.json"), report)
    print(f"\nwrote {os.path.join(args.out_dir, 'sampling.json')}")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--models", nargs="+", default=["bench", "demo"], choices=["bench", "demo"])
    parser.add_argument("--checkpoint_path", default=str(root / "checkpoints" / "demo_mnist_t2i"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="timed runs per schedule (the median is reported)")
    parser.add_argument("--fid_samples", type=int, default=0, help="demo samples per schedule for FID (0: skip)")
    parser.add_argument("--fid_batch", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", default="logs/sampling")
    return run_cli(run, parser.parse_args(argv))


if __name__ == "__main__":
    main()
