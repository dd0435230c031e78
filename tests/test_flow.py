"""Invariants of the flow on tiny random models, image and video, over the model's feature flags."""
import math

import pytest
import torch

from conftest import TINY_TXT_DIM, tiny_inputs as inputs, tiny_model
from transformer_flow import KVCache, MetaBlock, Model, permute

FLAGS = {
    "official": {},
    "no_sos": dict(sos=False),
    "exp_scale": dict(use_softplus=False, soft_clip=0.0, use_final_norm=False),
    "learned_positions": dict(rope=False),
    "r2l": dict(seq_order="R2L"),
    "text_in_all_blocks": dict(cond_top_only=False),
    "wide_top_gqa": dict(top_block_channels=96, num_heads=4, num_kv_heads=2),
    "gemma_style": dict(norm_type="rms_norm", use_qk_norm=True, use_post_norm=True, use_swiglu=True,
                        use_bias=False, hf_style_rope=True),
    "patch2_identity_block": dict(patch_size=2, img_size=8, layers_per_block=[0, 1, 2]),
}
VIDEO_FLAGS = {
    "official_video": dict(temporal_causal=2, shallow_block_local=True),
    "causal_shallow": dict(temporal_causal=1),
    "video_no_text": dict(temporal_causal=1, txt_size=0, txt_dim=0, cond_top_only=False),
}


ALL = [(n, f, None) for n, f in FLAGS.items()] + [(n, f, 3) for n, f in VIDEO_FLAGS.items()]


@pytest.mark.parametrize("name, flags, frames", ALL, ids=[a[0] for a in ALL])
@pytest.mark.parametrize("jacobi", [False, True], ids=["sequential", "jacobi"])
def test_inverse_of_forward_is_identity(name, flags, frames, jacobi, device):
    model = tiny_model(**flags, device=device)
    x, y = inputs(model, frames=frames, device=device)
    z, _, _ = model(x, y)
    assert z.shape == x.shape
    x_back = model.reverse(z, y, jacobi=jacobi, jacobi_block_size=4, jacobi_th=1e-12, jacobi_max_iter=200)
    torch.testing.assert_close(x_back, x, atol=1e-4, rtol=0)


@pytest.mark.parametrize("frames", [None, 2], ids=["image", "video"])
def test_logdet_equals_autograd_jacobian(frames, device):
    flags = VIDEO_FLAGS["official_video"] if frames else {}
    model = tiny_model(**flags, in_channels=1, device=device)
    x, y = inputs(model, batch=1, frames=frames, device=device)  # 20 (image) or 40 (video) dimensions
    z, outputs, logdets = model(x, y)
    jac = torch.autograd.functional.jacobian(lambda v: model(v.view_as(x), y)[0].flatten(), x.flatten())
    sign, logabsdet = torch.linalg.slogdet(jac.double())
    assert sign != 0
    total = sum(ld.double().sum() for ld in logdets)
    assert abs(total - logabsdet) < 1e-3 * max(1.0, abs(logabsdet.item()))
    # get_loss is the per-dimension negative log-likelihood without the Gaussian constant
    n = x.numel()
    log_p = -0.5 * z.double().pow(2).sum() - 0.5 * n * math.log(2 * math.pi) + logabsdet
    loss = model.get_loss(z, logdets)["loss"].double()
    assert abs(loss - (-log_p / n - 0.5 * math.log(2 * math.pi))) < 1e-4


@pytest.mark.parametrize("frames", [None, 3], ids=["image", "video"])
@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_jacobi_equals_sequential(frames, guidance, device):
    model = tiny_model(**(VIDEO_FLAGS["official_video"] if frames else {}), device=device)
    noise, y = inputs(model, frames=frames, device=device)
    if guidance:
        y = torch.cat([y, torch.randn_like(y)])
    seq = model.reverse(noise, y, guidance=guidance)
    jac = model.reverse(noise, y, guidance=guidance, jacobi=True, jacobi_block_size=3, jacobi_th=1e-12,
                        jacobi_max_iter=100)
    torch.testing.assert_close(jac, seq, atol=1e-5, rtol=0)



COMPILED = {"official": ({}, None, {}), "learned_positions": (FLAGS["learned_positions"], None, {}),
            "gemma_style": (FLAGS["gemma_style"], None, {}),
            "video_window": (VIDEO_FLAGS["official_video"], 5, dict(local_attn_window=3, context_length=2))}


@pytest.mark.parametrize("name", list(COMPILED))
def test_compiled_decoding_equals_eager(name, device):
    """compile_decode: the token-by-token steps (all of them, or auto's deep step) through compiled graphs give
    eager decoding's samples, with guidance and with a sliding window; the weights are inputs of the graphs, so
    weights changed after compiling are the ones used."""
    from torch._dynamo.utils import counters
    flags, frames, window = COMPILED[name]
    model = tiny_model(**flags, device=device)
    noise, y = inputs(model, frames=frames, device=device)
    y = torch.cat([y, torch.randn_like(y)])
    settings = dict(guidance=2.0, **window)
    torch._dynamo.reset()
    counters.clear()
    for jacobi in ["auto"] if window else [False, "auto"]:  # a window slides under auto (its deep step: tokens)
        eager = model.reverse(noise, y, jacobi=jacobi, **settings)
        compiled = model.reverse(noise, y, jacobi=jacobi, compile_decode=True, **settings)
        torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
    assert counters["stats"]["unique_graphs"] >= 1  # compiled, not run eagerly
    with torch.no_grad():
        model.blocks[-1].proj_out.weight.add_(0.05 * torch.randn_like(model.blocks[-1].proj_out.weight))
    changed = model.reverse(noise, y, jacobi=jacobi, compile_decode=True, **settings)
    torch.testing.assert_close(changed, model.reverse(noise, y, jacobi=jacobi, **settings), atol=1e-4, rtol=0)
    assert (changed - compiled).abs().max() > 1e-2

@pytest.mark.parametrize("with_text", [True, False])
def test_kv_cache_equals_recomputation(with_text, device):
    model = tiny_model(device=device)
    block = model.blocks[-1] if with_text else model.blocks[0]
    x, y = inputs(model, device=device)
    tokens = model.patchify(x).flatten(1, 3)
    text = y if with_text else None
    rope = model.rope_table(4, 5, 1, False, text, device=device)
    mu_full, sigma_full = block.step(tokens, text, rope)
    cache = KVCache(tokens.shape[1] + (y.shape[1] if with_text else 0))
    block.prefill(cache, text, rope, 1.0)
    mus, sigmas, start = [], [], 0
    for chunk in (1, 3, 7, tokens.shape[1] - 11):
        block.step(tokens[:, start:start + chunk] + 5.0, None, rope, cache.length, cache)  # an unkept write
        mu, sigma = block.step(tokens[:, start:start + chunk], None, rope, cache.length, cache)
        cache.commit(chunk)
        mus.append(mu), sigmas.append(sigma)
        start += chunk
    torch.testing.assert_close(torch.cat(mus, 1), mu_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(sigmas, 1), sigma_full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["official", "wide_top_gqa", "gemma_style"])
def test_layer_gradients_make_no_whole_tensor_zeros(name):
    """Attention and the trunk split their tensors: a slice's gradient would be a zero-filled tensor of the whole
    input, written then summed (4% of a training step on the CPU). The layers pass the joint [text; tokens] sequence
    whole: one join and one split a trunk, none a layer."""
    model = tiny_model(**FLAGS[name])
    block = model.blocks[-1]
    x, y = inputs(model)
    h = torch.randn(len(x), 20, block.proj_in.out_features, requires_grad=True)
    rope = model.rope_table(4, 5, 1, False, y, device="cpu")
    out = block.run(h, y, rope)
    seen, stack = set(), [out.sum().grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(f for f, _ in node.next_functions)
    names = {type(f).__name__ for f in seen}
    assert "SplitWithSizesBackward0" in names and not names & {"SliceBackward0", "SelectBackward0"}
    joint = torch.cat([block.proj_txt(y), block.proj_in(torch.randn(len(x), 20, block.proj_in.in_features))], 1)
    assert not block.attn_blocks[0](joint, rope)._is_view()  # what FSDP2 checks of a sharded layer's output


@pytest.mark.parametrize("name, flags, frames", ALL, ids=[a[0] for a in ALL])
def test_each_step_is_causal_in_its_token_order(name, flags, frames, device):
    model = tiny_model(**flags, device=device)
    x, y = inputs(model, batch=1, frames=frames, device=device)
    tokens = model.patchify(x)
    T = tokens.shape[1]
    seq = tokens.flatten(1, 3)
    L = seq.shape[1]
    for i, block in enumerate(model.blocks):
        if not hasattr(block, "step"):
            continue
        local = model.shallow_block_local and frames and i < len(model.blocks) - 1
        n_frames = 1 if local else T
        inp = seq[:, :L // T] if local else seq  # a frame-local step sees one frame
        text = y if block.has_text else None
        rope = model.rope_table(4, 4 + (model.rope is not None), n_frames, bool(frames), text, device=device)
        order = permute(torch.arange(inp.shape[1])[None, :, None], block.permutation, n_frames)[0, :, 0]
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))  # rank[r]: when raster token r is generated
        z, _ = block(inp, text, rope, n_frames)
        for r in range(0, inp.shape[1], 5):
            bumped = inp.clone()
            bumped[:, r] += 1.0
            changed = ((block(bumped, text, rope, n_frames)[0] - z).abs().amax(dim=(0, 2)) > 0).cpu()
            assert changed[r]
            assert not changed[rank < rank[r]].any(), f"block {i}: token {r} changed an earlier output"


@pytest.mark.parametrize("name", list(VIDEO_FLAGS))
def test_video_is_causal_in_frame_order(name, device):
    model = tiny_model(**VIDEO_FLAGS[name], device=device)
    x, y = inputs(model, batch=1, frames=4, device=device)
    z = model(x, y)[0]
    sample = model.reverse(z, y)
    for t in range(4):
        bumped = x.clone()
        bumped[:, t] += 1.0
        changed = (model(bumped, y)[0] - z).abs().flatten(2).amax(dim=(0, 2)) > 0
        assert changed[t] and not changed[:t].any()
        noise = z.clone()
        noise[:, t] += 1.0
        changed = (model.reverse(noise, y) - sample).abs().flatten(2).amax(dim=(0, 2)) > 1e-6
        assert changed[t] and not changed[:t].any()


@pytest.mark.parametrize("look_ahead", [1, 2])
def test_denoiser_frame_mask(look_ahead, device):
    """temporal_causal 1 makes the self-denoiser frame-causal; 2 lets each frame look one frame ahead."""
    model = tiny_model(temporal_causal=look_ahead, shallow_block_local=True, learnable_self_denoiser=True,
                       conditional_denoiser=True, denoiser_window=2, device=device)
    x, y = inputs(model, batch=1, frames=4, device=device)
    base = model.denoise(x, y)
    for t in range(1, 4):
        bumped = x.clone()
        bumped[:, t] += 1.0
        changed = (model.denoise(bumped, y) - base).abs().flatten(2).amax(dim=(0, 2)) > 0
        assert changed[t]
        assert changed[t - 1] == (look_ahead == 2)
        assert look_ahead == 2 or not changed[:t].any()


def test_guidance_with_identical_texts_is_unguided(device):
    model = tiny_model(device=device)
    noise, y = inputs(model, device=device)
    torch.testing.assert_close(model.reverse(noise, torch.cat([y, y]), guidance=3.0), model.reverse(noise, y),
                               atol=1e-5, rtol=0)


def test_image_to_video_keeps_the_observed_frames(device):
    model = tiny_model(**VIDEO_FLAGS["official_video"], device=device)
    noise, y = inputs(model, frames=4, device=device)
    first, _ = inputs(model, frames=2, seed=5, device=device)
    out = model.reverse(noise, torch.cat([y, torch.zeros_like(y)]), guidance=1.5, cond_frames=first, jacobi=True,
                        jacobi_block_size=4, jacobi_th=1e-10, jacobi_max_iter=50)
    assert torch.equal(out[:, :2], first)
    assert not torch.allclose(out[:, 2:], noise[:, 2:])


@pytest.mark.parametrize("jacobi", [True, "auto", "auto_accelerator"])
def test_sliding_window_starts_like_a_plain_decode(device, jacobi, request):
    """Videos beyond the attention window, under the original's Jacobi chunks and under auto's sliding schedules."""
    if jacobi == "auto_accelerator":
        request.getfixturevalue("accelerator_auto")
        jacobi = "auto"
    model = tiny_model(**VIDEO_FLAGS["official_video"], device=device)
    noise, y = inputs(model, frames=5, device=device)
    settings = dict(jacobi=jacobi, jacobi_block_size=4, jacobi_th=1e-12, jacobi_max_iter=100)
    long = model.reverse(noise, y, local_attn_window=3, context_length=2, **settings)
    assert long.shape == noise.shape
    torch.testing.assert_close(long[:, :3], model.reverse(noise[:, :3], y, **settings), atol=1e-5, rtol=0)
    # frame 3 is decoded like the last frame of the 3-frame clip that starts 2 frames earlier, re-encoded from SOS
    clip = model.reverse(torch.cat([model(long[:, 1:3], y)[0], noise[:, 3:4]], 1), y, **settings)
    torch.testing.assert_close(long[:, 3], clip[:, 2], atol=1e-4, rtol=0)


def test_load_state_dict_names_missing_and_unknown_keys():
    model = tiny_model()
    state = model.state_dict()
    state["var"] = torch.ones(16, 2)  # deprecated buffers of official checkpoints are accepted
    state["blocks.0.attn_mask"] = torch.ones(3, 3)
    model.load_state_dict(state)
    del state["blocks.0.proj_in.weight"]
    state["blocks.0.extra"] = torch.ones(1)
    with pytest.raises(RuntimeError, match=r"blocks\.0\.proj_in\.weight(.|\n)*blocks\.0\.extra|"
                                           r"blocks\.0\.extra(.|\n)*blocks\.0\.proj_in\.weight"):
        model.load_state_dict(state)


def test_bf16_transformer_with_float32_flow_arithmetic(device):
    model = tiny_model(**VIDEO_FLAGS["official_video"], learnable_self_denoiser=True, conditional_denoiser=True,
                       device=device)
    x, y = inputs(model, frames=2, device=device)
    z32 = model(x, y)[0]
    sample32 = model.reverse(z32, y, jacobi=True, jacobi_block_size=4, jacobi_th=1e-8, jacobi_max_iter=50)
    model.to(torch.bfloat16)
    z16, _, logdets = model(x, y)
    assert z16.dtype == torch.float32 and all(ld.dtype == torch.float32 for ld in logdets)
    assert (z16 - z32).abs().max() < 0.1
    sample16 = model.reverse(z32, y.bfloat16(), jacobi=True, jacobi_block_size=4, jacobi_th=1e-8, jacobi_max_iter=50)
    assert sample16.dtype == torch.float32 and (sample16 - sample32).abs().max() < 0.1
    assert model.denoise(x, y).shape == x.shape


def test_meta_device_build_takes_checkpoint_tensors(device):
    """No buffers to materialise: a model built on the meta device works once the weights are assigned."""
    model = tiny_model(device=device)
    with torch.device("meta"):
        empty = Model(model.config)
    empty.load_state_dict(model.state_dict(), assign=True)
    x, y = inputs(model, device=device)
    torch.testing.assert_close(empty(x, y)[0], model(x, y)[0])


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_no_fixed_device_and_no_host_sync(video):
    """On the meta device a tensor made on a fixed device does not combine, and reading a value (.item(), bool of a
    tensor) raises: the training pass and its loss, sequential decoding with guidance, image-to-video, the sliding
    window and both denoisers must do neither. (Jacobi reads one value per iteration to stop.) Meta kernels are
    slow, so the token grids are small."""
    flags = dict(VIDEO_FLAGS["official_video"], learnable_self_denoiser=True, conditional_denoiser=True) if video \
        else {}
    model = tiny_model(**flags).to("meta")
    x = torch.empty((1, 3, model.in_channels, 2, 2) if video else (1, model.in_channels, 2, 3), device="meta")
    y = torch.empty(1, model.txt_size, TINY_TXT_DIM, device="meta")
    y_cfg = torch.cat([y, torch.zeros_like(y)])
    z, outputs, logdets = model(x.requires_grad_(), y)
    model.get_loss(z, logdets, outputs, latent_norm_regularization=1e-4)["loss"].backward()
    assert x.grad.device.type == "meta"
    assert model.score_denoise(x, y, 0.3).shape == x.shape
    z = z.detach()
    if not video:
        assert model.reverse(z, y_cfg, guidance=2.0).device.type == "meta"
        return
    assert model.reverse(z[:, :2], y_cfg, guidance=2.0, cond_frames=x[:, :1].detach()).device.type == "meta"
    assert model.reverse(z, y, local_attn_window=2, context_length=1).shape == x.shape
    assert model.denoise(x, y).device.type == "meta"


def test_jacobi_agreement_reduces_on_the_decoding_device(monkeypatch):
    """Under NCCL the stop vote is a tensor on the rank's own GPU (the decoding tensor's device), under gloo on the
    CPU; one rank's 'not yet' keeps every rank iterating."""
    import transformer_flow as tf
    seen = []

    def all_reduce(t, op):
        seen.append(t.device)
        t.fill_(0.0)  # another rank has not converged

    monkeypatch.setattr(tf.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(tf.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(tf.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(tf.dist, "get_backend", lambda: "nccl")
    assert tf.collective_device(torch.device("cuda", 3)) == torch.device("cuda", 3)
    assert tf.all_ranks_agree(True, torch.device("cpu")) is False  # the bare "cuda" device does not exist here
    monkeypatch.setattr(tf.dist, "get_backend", lambda: "gloo")
    assert tf.collective_device(torch.device("cuda", 3)) == torch.device("cpu")
    assert tf.all_ranks_agree(True, torch.device("cuda", 1)) is False
    assert seen == [torch.device("cpu")] * 2


@pytest.fixture
def accelerator_auto(monkeypatch):
    """--jacobi auto as an accelerator gets it (the deep step's sliding window), on this CPU."""
    import transformer_flow as tf
    monkeypatch.setattr(tf, "auto_kind", lambda device: "accelerator")


@pytest.mark.parametrize("frames", [None, 3], ids=["image", "video"])
@pytest.mark.parametrize("window", [3, 1000], ids=["window3", "whole_sequence"])
def test_sliding_window_jacobi_equals_sequential(frames, window, accelerator_auto):
    """The sliding schedule commits converged prefixes into the KV cache; at a tiny threshold it is exact."""
    model = tiny_model(**(VIDEO_FLAGS["official_video"] if frames else {}))
    noise, y = inputs(model, frames=frames)
    y = torch.cat([y, torch.randn_like(y)])
    seq = model.reverse(noise, y, guidance=2.0)
    auto = model.reverse(noise, y, guidance=2.0, jacobi="auto", jacobi_block_size=window, jacobi_th=1e-12,
                         jacobi_max_iter=1000)
    torch.testing.assert_close(auto, seq, atol=1e-5, rtol=0)


def count_steps(model, run):
    """(network calls, token evaluations) per flow step while `run()` decodes."""
    counts = {id(b): [0, 0] for b in model.blocks}
    original = MetaBlock.step

    def counted(self, u, *args, **kwargs):
        counts[id(self)][0] += 1
        counts[id(self)][1] += u.shape[1]
        return original(self, u, *args, **kwargs)

    MetaBlock.step = counted
    try:
        run()
    finally:
        MetaBlock.step = original
    return [tuple(counts[id(b)]) for b in model.blocks]


def test_jacobi_chunks_skip_their_exact_prefix():
    """Iteration i of a chunk leaves its first i + 1 tokens final: they go into the cache and are not evaluated
    again, so a 4-token chunk takes at most 4 calls and 4 + 3 + 2 + 1 evaluations, and ends at sequential's result
    (at threshold 0 the original iterated on to max_iter)."""
    model = tiny_model()
    noise, y = inputs(model)  # 20 tokens a step: 5 chunks of 4

    def jacobi():
        return model.reverse(noise, y, jacobi=True, jacobi_block_size=4, jacobi_th=0.0, jacobi_max_iter=32)

    assert count_steps(model, jacobi) == [(20, 50)] * 3
    torch.testing.assert_close(jacobi(), model.reverse(noise, y), atol=1e-5, rtol=0)


def test_auto_picks_per_flow_step_and_device():
    from transformer_flow import SEQUENTIAL
    model = tiny_model()
    cpu, gpu = (model.decode_schedules("auto", device=torch.device(d)) for d in ("cpu", "cuda"))
    assert all(s.sliding and s.block_size > 1000 and s.max_iter == 2 for s in cpu[:-1] + gpu[:-1])
    assert cpu[-1] is SEQUENTIAL and gpu[-1].sliding and gpu[-1].block_size == 64
    assert cpu[0].threshold == 1e-3 and gpu[-1].threshold == 2e-2  # the deep step's looser threshold on GPUs
    given = model.decode_schedules("auto", threshold=1e-4, device=torch.device("cuda"))
    assert {s.threshold for s in given} == {1e-4}
    assert model.decode_schedules(True)[0].block_size == 16 and model.decode_schedules(False) == [SEQUENTIAL] * 3
    compiled = model.decode_schedules("auto", device=torch.device("cpu"), compiled=True)
    assert [s.compiled for s in compiled] == [False, False, True]  # only a token-by-token step is compiled
    assert not any(s.compiled for s in model.decode_schedules(True, compiled=True))
    assert all(s.compiled for s in model.decode_schedules(False, compiled=True))


def test_sliding_window_never_reevaluates_a_converged_token(accelerator_auto):
    """An identity flow (zero output heads) converges at once: each window is evaluated exactly once."""
    model = tiny_model()
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.zero_(), block.proj_out.bias.zero_()
    noise, y = inputs(model)  # 20 tokens a step
    counts = count_steps(model, lambda: model.reverse(noise, y, jacobi="auto", jacobi_block_size=8))
    assert counts == [(1, 20), (1, 20), (3, 20)]  # whole sequence twice, then windows of 8, 8 and 4


def test_evaluation_cap_takes_the_last_iterate():
    """With max_iter 1 a whole-sequence window is one Jacobi step from the first guess z: x_i = mu_i(z) +
    sigma_i(z) z_i, computed in one parallel pass."""
    from transformer_flow import DecodeSchedule
    model = tiny_model()
    block = model.blocks[0]
    z = model.patchify(inputs(model)[0]).flatten(1, 3)
    rope = model.rope_table(4, 5, 1, False, device=z.device)
    once = block.inverse(z, rope=rope, schedule=DecodeSchedule(100, 100, 1, 0.0, sliding=True))
    zp = permute(z, block.permutation, 1)  # generation order
    mu, sigma = block.step(torch.cat([block.sos_embed.expand(len(z), 1, -1), zp[:, :-1]], 1), None, rope)
    torch.testing.assert_close(once, permute(mu + sigma * zp, block.permutation, 1), atol=1e-6, rtol=0)
