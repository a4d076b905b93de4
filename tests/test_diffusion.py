"""Diffusion core: schedule, conditioning, guidance, samplers, prediction types, long-audio windows, losses."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from temposyncdiff.diffusion.losses import diffusion_loss, identity_loss, sync_loss, temporal_loss
from temposyncdiff.diffusion.sampling import (
    generate_long,
    make_sampler,
    sample,
    window_borders,
    window_plan,
)
from temposyncdiff.diffusion.schedule import PREDICTION_TYPES, NoiseSchedule
from temposyncdiff.nets.denoiser import Denoiser
from temposyncdiff.nets.syncnet import SyncNet
from temposyncdiff.regions import region_weight

B, T, C, S = 2, 4, 4, 8


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny nets run on one intra-op thread


def tiny_net(temporal: str = "attention", **kw) -> Denoiser:
    torch.manual_seed(0)
    levels = {"attention_levels": (1,), "cross_attention_levels": (1,), "temporal_levels": (0, 1)}
    net = Denoiser(C, (8, 16), temporal=temporal, heads=2, cond_dim=16, audio_dim=8, window=T, **levels, **kw)
    with torch.no_grad():  # zero-initialised output layers would hide the conditioning from a fresh net
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return net.eval()


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "ref_latent": torch.randn(B, C, S, S, generator=g),
        "audio_emb": torch.randn(B, T, 8, generator=g),
        "visemes": torch.randint(0, 15, (B, T), generator=g),
    }


def test_schedule_agrees_with_diffusers():
    sch = NoiseSchedule(prediction_type="v_prediction", beta_schedule="scaled_linear")
    ref = DDPMScheduler.from_config(sch.scheduler.config)
    x0, noise, t = torch.randn(3, T, C, S, S), torch.randn(3, T, C, S, S), torch.tensor([0, 500, 999])
    assert torch.allclose(sch.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-5)
    assert torch.allclose(sch.target(x0, noise, t), ref.get_velocity(x0, noise, t), atol=1e-5)
    assert not ref.config.clip_sample  # latents are not bounded to [-1, 1]
    for kind in PREDICTION_TYPES:
        s = NoiseSchedule(prediction_type=kind, beta_schedule="scaled_linear")
        x_t = s.add_noise(x0, noise, t)
        assert torch.allclose(s.to_x0(x_t, s.target(x0, noise, t), t), x0, atol=1e-3)
        assert (s.loss_weight(t) > 0).all()


@pytest.mark.parametrize("temporal", ["attention", "conv"])
def test_conditioning_changes_output(temporal):
    net, cond = tiny_net(temporal), inputs()
    sch = NoiseSchedule()

    def run(**change) -> torch.Tensor:
        sampler = make_sampler("ddim", sch.scheduler.config)
        return sample(net, (B, T, C, S, S), {**cond, **change}, sampler, 3, generator=torch.Generator().manual_seed(1))

    base = run()
    assert base.shape == (B, T, C, S, S) and torch.isfinite(base).all()
    zero = {k: torch.zeros_like(v) for k, v in cond.items()}
    for change in (
        {"audio_emb": zero["audio_emb"]},
        {"ref_latent": zero["ref_latent"]},
        {"visemes": zero["visemes"]},
        {"audio_emb": None, "visemes": None},
    ):
        assert (run(**change) - base).abs().max() > 1e-4, change
    # per-sample condition dropout equals the null condition for those samples only
    x, t = torch.randn(B, T, C, S, S), torch.tensor([10, 900])
    drop = net(x, t, **cond, drop_cond=torch.tensor([True, False]))
    assert torch.allclose(drop[0], net(x, t, cond["ref_latent"])[0], atol=1e-5)
    assert torch.allclose(drop[1], net(x, t, **cond)[1], atol=1e-5)


class Counting:
    """Wraps a net and counts calls (and calls without the audio condition)."""

    def __init__(self, net):
        self.net, self.calls, self.uncond = net, 0, 0

    def __call__(self, x, t, **cond):
        self.calls += 1
        self.uncond += cond.get("audio_emb") is None
        return self.net(x, t, **cond)


def test_guidance_scale_one_is_no_guidance():
    net, cond, sch = tiny_net(), inputs(), NoiseSchedule()
    runs = {}
    for scale in (1.0, 3.0):
        fn = Counting(net)
        runs[scale] = sample(
            fn,
            (B, T, C, S, S),
            cond,
            make_sampler("ddim", sch.scheduler.config),
            5,
            scale,
            torch.Generator().manual_seed(0),
        )
        assert (fn.calls, fn.uncond) == ((5, 0) if scale == 1.0 else (10, 5))
    plain = sample(
        net, (B, T, C, S, S), cond, make_sampler("ddim", sch.scheduler.config), 5, 1.0, torch.Generator().manual_seed(0)
    )
    assert torch.equal(runs[1.0], plain) and not torch.allclose(runs[1.0], runs[3.0])

    def blind(x, t, **c):  # ignores the audio: guidance changes nothing
        return net(x, t, c["ref_latent"])

    a, b = (
        sample(
            blind,
            (B, T, C, S, S),
            cond,
            make_sampler("ddim", sch.scheduler.config),
            5,
            s,
            torch.Generator().manual_seed(0),
        )
        for s in (1.0, 4.0)
    )
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dpmpp"])
def test_sampler_is_deterministic_under_a_seed(kind):
    net, cond, sch = tiny_net(), inputs(), NoiseSchedule()

    def run(seed: int) -> torch.Tensor:
        return sample(
            net,
            (B, T, C, S, S),
            cond,
            make_sampler(kind, sch.scheduler.config),
            4,
            2.0,
            torch.Generator().manual_seed(seed),
        )

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b) and not torch.allclose(a, c) and torch.isfinite(a).all()


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_each_prediction_type_trains_one_step(prediction_type):
    net = tiny_net().train()
    sch = NoiseSchedule(prediction_type=prediction_type, beta_schedule="scaled_linear")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    cond, x0 = inputs(), torch.randn(B, T, C, S, S)
    t, noise = sch.sample_timesteps(B, generator=torch.Generator().manual_seed(0)), torch.randn_like(x0)
    mask = torch.ones(B, T, dtype=torch.bool)
    before = [p.detach().clone() for p in net.parameters()]
    pred = net(sch.add_noise(x0, noise, t), t, **cond)
    loss = diffusion_loss(pred, sch.target(x0, noise, t), mask, sch.loss_weight(t))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))


@pytest.mark.parametrize("window,overlap", [(8, 0), (8, 2), (8, 5), (4, 1)])
def test_window_plan_covers_every_frame_once(window, overlap):
    for n in [1, 3, window - 1, window, window + 1, 13, 2 * window, 2 * window + 3, 31, 100]:
        plan = window_plan(max(n, window), window, overlap)
        made = torch.zeros(max(n, window), dtype=torch.long)
        for start, known in plan:
            assert start >= 0 and start + window <= max(n, window) and known >= (overlap if start else 0)
            assert (made[start : start + known] == 1).all()  # motion frames were generated before
            made[start + known : start + window] += 1
        assert (made == 1).all(), (n, plan)
        assert (
            window_borders(n, window, overlap)
            == [s + k for s, k in plan[1:]]
            == sorted(set(window_borders(n, window, overlap)))
        )


def test_generate_long_passes_motion_frames():
    calls = []

    def fake(x, t, ref_latent, audio_emb, visemes, motion, motion_mask):
        calls.append((visemes[0].clone(), motion.clone(), motion_mask.clone()))
        return torch.zeros_like(x)

    sch, n, w = NoiseSchedule(prediction_type="sample"), 13, 4
    vis = torch.arange(n)[None].expand(B, -1)  # frame index as the per-frame condition
    out = generate_long(
        fake,
        torch.zeros(B, C, S, S),
        torch.zeros(B, n, 8),
        vis,
        n,
        w,
        1,
        (C, S, S),
        lambda: make_sampler("ddim", sch.scheduler.config),
        1,
    )
    assert out.shape == (B, n, C, S, S)
    starts = [int(v[0]) for v, _, _ in calls]
    assert starts == [s for s, _ in window_plan(n, w, 1)] and all(len(v) == w for v, _, _ in calls)
    assert [int(m[0].sum()) for _, _, m in calls] == [k for _, k in window_plan(n, w, 1)]
    short = generate_long(
        fake,
        torch.zeros(B, C, S, S),
        None,
        vis[:, :3],
        3,
        w,
        1,
        (C, S, S),
        lambda: make_sampler("ddim", sch.scheduler.config),
        1,
    )
    assert short.shape == (B, 3, C, S, S) and calls[-1][0].tolist() == [0, 1, 2, 2]  # padded with the last frame


def test_aux_losses_have_gradients():
    x0, ref = torch.randn(B, T, C, S, S), torch.randn(B, C, S, S)
    x0_hat = (x0 + 0.1 * torch.randn_like(x0)).requires_grad_()
    mask = torch.tensor([[True] * T, [True] * (T - 1) + [False]])
    total = identity_loss(x0_hat, ref, mask, (0.0, 0.0, 1.0, 0.5)) + temporal_loss(x0_hat, x0, mask)
    total.backward()
    assert torch.isfinite(total) and x0_hat.grad.abs().sum() > 0
    assert temporal_loss(x0, x0, mask) == 0
    w = region_weight(S, S, (0.25, 0.5, 0.75, 1.0), 4.0)
    assert region_weight(S, S, (0.25, 0.5, 0.75, 1.0), 1.0) is None
    assert w.sum() == S * S + 3 * (S // 2) ** 2
    assert torch.allclose(
        diffusion_loss(x0_hat, x0, mask, pixel_weight=torch.full((S, S), 3.0)), diffusion_loss(x0_hat, x0, mask)
    )
    outside = x0.clone()
    outside[..., :2, :] += 1  # errors outside the weighted region count less
    assert diffusion_loss(outside, x0, mask, pixel_weight=w) < diffusion_loss(outside, x0, mask)
    expert = SyncNet(image_size=32, frames=3, mel_window=12, width=8, dim=16).eval()
    frames = torch.rand(B, 6, 3, 32, 32, requires_grad=True)
    loss = sync_loss(expert, frames, torch.randn(B, 6, 80, 16), torch.ones(B, 6, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and frames.grad.abs().sum() > 0


def test_pose_source_is_masked_inside_the_box():
    """A net built with pose_mask sees the pose latents outside the box only; without pose it refuses to run."""
    net = tiny_net(pose_mask=(0.25, 0.5, 0.75, 1.0))
    x, t = torch.randn(B, T, C, S, S, generator=torch.Generator().manual_seed(1)), torch.full((B,), 500)
    pose = torch.randn(B, T, C, S, S, generator=torch.Generator().manual_seed(2))
    inside = pose.clone()
    inside[..., S // 2 :, S // 4 : 3 * S // 4] += 5.0  # change only what the mask hides
    outside = pose.clone()
    outside[..., : S // 2, :] += 5.0
    with torch.no_grad():
        base = net(x, t, **inputs(), pose=pose)
        assert torch.equal(base, net(x, t, **inputs(), pose=inside))
        assert not torch.allclose(base, net(x, t, **inputs(), pose=outside))
        with pytest.raises(ValueError, match="pose"):
            net(x, t, **inputs())
    with pytest.raises(ValueError, match="pose_mask"):
        tiny_net(pose_mask=(0.5, 0.5, 0.4, 1.0))


def test_lip_shapes_condition_the_net_and_its_head_predicts_them_otherwise():
    """lip_dim: given shapes change the output; without them the head's prediction is used (the same output as
    passing that prediction); dropped conditions and the unconditional branch ignore the shapes."""
    net = tiny_net(lip_dim=3)
    x, t = torch.randn(B, T, C, S, S, generator=torch.Generator().manual_seed(1)), torch.full((B,), 500)
    lips_a, lips_b = torch.zeros(B, T, 3), torch.full((B, T, 3), 2.0)
    cond = inputs()
    with torch.no_grad():
        out_a, out_b = net(x, t, **cond, lips=lips_a), net(x, t, **cond, lips=lips_b)
        assert not torch.allclose(out_a, out_b)
        guess = net.predict_lips(cond["audio_emb"], cond["visemes"])
        assert guess.shape == (B, T, 3)
        assert torch.allclose(net(x, t, **cond), net(x, t, **cond, lips=guess), atol=1e-6)
        net.lip_gain.fill_(2.0)  # at inference the head's prediction is scaled by the calibrated gain
        assert torch.equal(net.predict_lips(cond["audio_emb"], cond["visemes"]), guess)
        assert torch.allclose(net(x, t, **cond), net(x, t, **cond, lips=2 * guess), atol=1e-6)
        drop = torch.ones(B, dtype=torch.bool)
        assert torch.equal(
            net(x, t, **cond, drop_cond=drop, lips=lips_a), net(x, t, **cond, drop_cond=drop, lips=lips_b)
        )
        ref = cond["ref_latent"]
        assert torch.equal(net(x, t, ref), net(x, t, ref, None, None, lips=None))
    net.lip_norm.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 2.0]]))
    assert torch.allclose(net.standardize_lips(torch.tensor([1.5, 2.0, 7.0])), torch.tensor([1.0, 0.0, 2.0]))
    assert tiny_net().config["lip_dim"] == 0 and not hasattr(tiny_net(), "lip_head")


def test_generate_long_gives_lip_shapes_per_window():
    calls = []

    def fake(x, t, ref_latent, audio_emb, visemes, motion, motion_mask, lips=None):
        calls.append(lips.clone())
        return torch.zeros_like(x)

    sch, n, w = NoiseSchedule(prediction_type="sample"), 7, 4
    lips = torch.arange(n, dtype=torch.float32)[None, :, None].expand(B, n, 3)
    make = lambda: make_sampler("ddim", sch.scheduler.config)  # noqa: E731
    generate_long(fake, torch.zeros(B, C, S, S), None, None, n, w, 1, (C, S, S), make, 1, lips=lips)
    assert [c[0, :, 0].tolist() for c in calls] == [[s + i for i in range(w)] for s, _ in window_plan(n, w, 1)]


def test_generate_long_gives_pose_per_window_and_the_reference_by_default():
    calls = []

    def fake(x, t, ref_latent, audio_emb, visemes, motion, motion_mask, pose):
        calls.append(pose.clone())
        return torch.zeros_like(x)

    fake.pose_mask = (0.0, 0.5, 1.0, 1.0)
    sch, n, w = NoiseSchedule(prediction_type="sample"), 7, 4
    pose = torch.arange(n, dtype=torch.float32)[None, :, None, None, None].expand(B, n, C, S, S)
    ref = torch.full((B, C, S, S), -1.0)
    make = lambda: make_sampler("ddim", sch.scheduler.config)  # noqa: E731
    generate_long(fake, ref, None, None, n, w, 1, (C, S, S), make, 1, pose=pose)
    assert [p[0, :, 0, 0, 0].tolist() for p in calls] == [[s + i for i in range(w)] for s, _ in window_plan(n, w, 1)]
    calls.clear()
    generate_long(fake, ref, None, None, n, w, 1, (C, S, S), make, 1)  # a photo: the reference is every frame's pose
    assert all((p == -1).all() for p in calls)
