"""Stage 3 (student): trajectory distillation, few-step sampling, frozen teacher, Lightning training and export."""

from __future__ import annotations

from functools import partial

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from temposyncdiff.diffusion.distill import student_sampler, student_timesteps, teacher_couplings, trajectory_loss
from temposyncdiff.diffusion.sampling import make_sampler, sample
from temposyncdiff.diffusion.schedule import NoiseSchedule
from temposyncdiff.stages.scoring import generate
from temposyncdiff.training import train
from temposyncdiff.utils.weights import load_net, save_weights
from tests.helpers.configs import TINY_STUDENT as TINY
from tests.helpers.nets import LATENT_CHANNELS as C
from tests.helpers.nets import WINDOW as T
from tests.helpers.nets import student_run as _setup
from tests.helpers.nets import tiny_denoiser as tiny_net

B, S = 2, 8


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny nets run on one intra-op thread


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "ref_latent": torch.randn(B, C, S, S, generator=g),
        "audio_emb": torch.randn(B, T, 16, generator=g),
        "visemes": torch.randint(0, 15, (B, T), generator=g),
    }


class Counting:
    def __init__(self, net):
        self.net, self.calls, self.window = net, 0, net.window

    def __call__(self, x, t, **cond):
        self.calls += 1
        return self.net(x, t, **cond)

    def embed_audio(self, mel):
        return self.net.embed_audio(mel)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_each_step_count_makes_that_many_net_calls(steps):
    cfg = NoiseSchedule(prediction_type="sample").scheduler.config
    assert student_timesteps(cfg, [1, 2, 4]).tolist() == [249, 499, 749, 999]
    net = Counting(tiny_net().eval())
    x = sample(net, (B, T, C, S, S), inputs(), student_sampler(cfg), steps, 1.0, torch.Generator().manual_seed(0))
    assert net.calls == steps and torch.isfinite(x).all()
    net.calls = 0  # a whole utterance of one window through the inference path (audio encoder, visemes from it)
    generate(
        net,
        inputs()["ref_latent"],
        torch.randn(B, T, 80, 16),
        None,
        torch.Generator().manual_seed(0),
        partial(student_sampler, cfg),
        steps,
        1.0,
        1,
    )
    assert net.calls == steps


def test_couplings_are_the_teachers_ode_solution_and_the_student_overfits_them():
    teacher, student = tiny_net(seed=0).eval().requires_grad_(False), tiny_net((8, 8), seed=1).train()
    sch = NoiseSchedule(prediction_type="v_prediction")
    cond, shape = inputs(), (B, T, C, S, S)
    ddim = partial(make_sampler, "ddim", sch.scheduler.config)
    noise, target = teacher_couplings(teacher, shape, cond, ddim(), 3, 2.0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(noise, torch.randn(shape, generator=g))
    assert torch.equal(target, sample(teacher, shape, cond, ddim(), 3, 2.0, torch.Generator().manual_seed(5)))
    student_sch = NoiseSchedule(prediction_type="sample")
    grid, mask = student_timesteps(student_sch.scheduler.config, [1, 2, 4]), torch.ones(B, T, dtype=torch.bool)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        t = grid[torch.tensor([step % 4, (step + 2) % 4])]
        loss, x0_hat = trajectory_loss(student, student_sch, noise, target, t, mask, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert x0_hat.shape == shape and sum(losses[-4:]) < 0.5 * sum(losses[:4])
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_is_frozen_outside_the_student(data_root, tmp_path):
    cfg, _ = _setup(
        data_root, tmp_path, ["model.identity_weight=0.1", "model.temporal_weight=0.1", "model.data_weight=1"]
    )
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("stage")
    model = hydra.utils.instantiate(model_cfg)
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    model.setup("fit")
    model.couplings("train", dm.train_dataloader().dataset)
    out = model.losses(next(iter(dm.train_dataloader())))
    out["loss"].backward()
    teacher = model.frozen("teacher")
    assert {"distill", "data", "identity", "temporal", "viseme_ce"} <= set(out) and torch.isfinite(out["loss"])
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in model.net.parameters())
    assert all(k.startswith("net.") for k in model.state_dict())  # teacher and VAE are not in checkpoints
    assert {id(p) for p in model.parameters()}.isdisjoint(id(p) for p in teacher.parameters())
    theirs = dict(teacher.audio.named_parameters())
    assert all(torch.equal(p, theirs[k]) for k, p in model.net.audio.named_parameters())  # initialised from the teacher


def test_student_trains_validates_and_exports(data_root, tmp_path):
    cfg, ckpt = _setup(data_root, tmp_path, ["model.val_frames=24"])  # LSE needs >= 20 windows
    train(cfg)
    net, meta = load_net(ckpt / "student_best.pt", "student")
    teacher, _ = load_net(ckpt / "teacher_best.pt", "teacher")
    assert (ckpt / "student_last.pt").is_file() and list((ckpt / "couplings").glob("train-*.pt"))
    assert meta["schedule"]["prediction_type"] == "sample" and meta["guidance_scale"] == 1.0 and meta["steps"] == 2
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in teacher.parameters())
    x, t, cond = torch.randn(B, T, C, 16, 16), torch.tensor([999, 499]), inputs()
    cond["ref_latent"] = torch.randn(B, C, 16, 16)
    save_weights(tmp_path / "again.pt", "student", net, meta)  # export -> import -> export round trip
    again, meta2 = load_net(tmp_path / "again.pt", "student")
    assert meta2 == meta and torch.equal(net(x, t, **cond), again(x, t, **cond))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(k.startswith("net.") for k in state["state_dict"])
    n_opt = sum(len(g["params"]) for g in state["optimizer_states"][0]["param_groups"])
    # the optimiser holds exactly the student (with its audio encoder) but its unused null audio token
    assert n_opt == len([n for n, _ in net.named_parameters() if n != "null_audio"])
    assert list((tmp_path / "run" / "samples").rglob("*.mp4"))
    header = next((tmp_path / "run" / "csv").rglob("metrics.csv")).read_text().splitlines()[0]
    for key in (
        "val/loss",
        "val/distill",
        "val/student2/psnr_mouth",
        "val/teacher2/psnr_mouth",
        "val/student1/psnr_rec",
        "val/student2/flicker",
        "val/student2/psnr_vs_ref",
        "val/student2/lse_c_gap",
        "val/teacher2/lse_c_gt_gap",
    ):
        assert key in header, key


def test_ablation_writes_the_table(data_root, tmp_path):
    from temposyncdiff.cli.student_ablation import run_ablation

    _setup(data_root, tmp_path)
    overrides = [
        *TINY[1:],
        f"paths.root_dir={data_root}",
        f"paths.checkpoint_dir={tmp_path / 'ckpt'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.outputs_dir={tmp_path / 'out'}",
        "extras.print_config=false",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
    ]
    rows = run_ablation(overrides, {"full": [], "no_temporal": ["model.temporal_weight=0"]}, (1, 2), (2, 1))
    assert [(r["model"], r["steps"]) for r in rows] == [
        ("teacher", 2),
        ("teacher", 1),
        ("student/full", 1),
        ("student/full", 2),
        ("student/no_temporal", 1),
        ("student/no_temporal", 2),
    ]
    assert rows[3]["temporal"] > 0 and rows[5]["temporal"] == 0 and all(r["ms_per_frame"] > 0 for r in rows)
    assert rows[3]["data"] == 1.0  # the quickstart student's ground-truth term
    table = (tmp_path / "out" / "tables" / "student_ablation.md").read_text()
    assert "student/no_temporal" in table and (tmp_path / "out" / "tables" / "student_ablation.csv").is_file()


def test_export_keeps_the_rendered_lip_gain(data_root, tmp_path, monkeypatch):
    """before_export: the shape-level gain, then the rendered gain's multiplier on top, both in the exported net;
    the best and last exports of the same weights are calibrated once."""
    from temposyncdiff.stages import student as student_module

    cfg, _ = _setup(data_root, tmp_path, ["model.net.lip_dim=3"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("stage")
    model = hydra.utils.instantiate(model_cfg)
    monkeypatch.setattr(student_module, "calibrate_lip_gain", lambda net, *_: net.lip_gain.fill_(1.5))
    calls = []

    def rendered(dm):
        calls.append(dm)
        model.net.lip_gain.mul_(2.0)
        return {"multiplier": 2.0}

    monkeypatch.setattr(model, "calibrate_rendered_gain", rendered)
    for _ in range(2):  # best, then last: the same weights
        model.net.lip_gain.fill_(1.0)
        model.before_export()
        assert torch.equal(model.net.lip_gain, torch.full((3,), 3.0)) and model.lip_calibration == {"multiplier": 2.0}
    assert len(calls) == 1
