"""tsd-eval: end to end on tiny exports, and each metric against hand-computed values through the eval code path."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from temposyncdiff.cli.eval import evaluate
from temposyncdiff.cli.pipeline import key_numbers
from temposyncdiff.data.manifest import read_manifest
from temposyncdiff.data.video import probe
from temposyncdiff.diffusion.schedule import SCHEDULE_KEYS, NoiseSchedule
from temposyncdiff.errors import UserError
from temposyncdiff.evaluation.baselines import BaselineUnavailable, synthetic_retake
from temposyncdiff.evaluation.clips import load_clips
from temposyncdiff.evaluation.denoise import denoise_from
from temposyncdiff.evaluation.generation import GenerationScorer, evaluate_generation
from temposyncdiff.evaluation.report import face_targets, write_outputs
from temposyncdiff.inference.pipeline import Timings
from temposyncdiff.metrics import identity
from temposyncdiff.nets.syncnet import SyncNet, export_expert
from tests.helpers.configs import compose_config, face_regions, tiny_eval
from tests.helpers.field import save_arcface_onnx, save_fid_inception, save_i3d, save_syncnet
from tests.helpers.nets import save_tiny_exports
from tests.helpers.run_if import RunIf

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny nets on shared CPUs


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Tiny random VAE, teacher and lip-sync expert exports (32 px)."""
    out = tmp_path_factory.mktemp("ckpt")
    save_tiny_exports(out, guidance_scale=1.5)
    export_expert(SyncNet(image_size=32, dim=16, width=8), out / "syncnet.pt")
    return out


def strict_json(path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_tsd_eval_end_to_end(exports, data_root, tmp_path):
    cfg = compose_config(
        "eval",
        [
            "split=val",
            "max_utterances=3",
            f"vae={exports / 'vae_pretrained.pt'}",
            f"paths.outputs_dir={tmp_path / 'out'}",
            f"models.0.checkpoint={exports / 'teacher_best.pt'}",
            "models.0.steps=[1,2]",
            f"models.1.checkpoint={tmp_path / 'student_best.pt'}",
            "models.1.steps=[1]",
            "eval.denoise.noise_levels=[200,800]",
            "eval.denoise.max_frames=6",
            "eval.generation.max_frames=16",
            f"eval.generation.syncnet={exports / 'syncnet.pt'}",
            "eval.generation.vshift=3",
            "eval.generation.identity.stride=8",
            f"lpips.torch_home={tmp_path / 'torch'}",
            "threads=1",
        ],
        data_root,
        tmp_path / "run",
    )
    evaluate(cfg)
    out = tmp_path / "out"
    report = strict_json(out / "metrics" / "eval_report.json")
    assert {"date", "versions", "device", "config", "checkpoints", "split", "denoise", "generation"} <= set(report)
    assert report["versions"]["torch"] == torch.__version__ and "temposyncdiff" in report["versions"]
    assert report["device"]["device"] == "cpu" and report["config"]["split"] == "val"
    sha = hashlib.sha256((exports / "teacher_best.pt").read_bytes()).hexdigest()
    assert report["checkpoints"]["teacher"]["sha256"] == sha and report["checkpoints"]["student"]["status"] == "missing"
    assert "sha256" in report["checkpoints"]["syncnet"] and "sha256" in report["checkpoints"]["vae"]
    utts = report["split"]["utterances"]
    assert len(utts) == 3 and all(u["num_frames"] == 16 and u["reference"].split("#")[0] != u["id"] for u in utts)

    den = report["denoise"]
    assert set(den["levels"]) == {"200", "800"} and den["num_frames"] == 18
    for level in den["levels"].values():
        assert set(level) == {"noisy", "teacher@1", "teacher@2", "student@1"}
        assert level["student@1"]["status"] == "unavailable" and "student_best.pt" in level["student@1"]["reason"]
        t = level["teacher@2"]
        assert t["status"] == "ok" and isinstance(t["full"]["psnr"], float) and 0 < t["full"]["ssim"] <= 1
        assert t["lpips"]["status"] == "unavailable" and t["ms_per_frame"] > 0
    noisy = {t: den["levels"][t]["noisy"]["full"]["psnr"] for t in ("200", "800")}
    assert noisy["200"] > noisy["800"]  # more noise, further from the reconstruction

    gen = report["generation"]
    assert set(gen["results"]) == {"teacher@1", "teacher@2", "student@1"}
    assert gen["results"]["student@1"]["status"] == "unavailable"
    r = gen["results"]["teacher@2"]
    assert r["steps"] == 2 and r["sampler"] == "ddim" and r["guidance_scale"] == 1.5
    assert r["fidelity"]["num_frames"] == 48 and set(r["fidelity"]) >= {"full", "mouth", "upper_face"}
    assert r["flicker"]["num_clips"] == 3 and r["seam"]["num_clips"] == 3 and r["seam"]["ratio_gt"] > 0
    assert r["lip_sync"]["own"]["num_clips"] == 3 and r["lip_sync"]["swapped"]["num_clips"] == 3
    assert isinstance(r["lip_sync"]["gap_lse_c"], float) and gen["ground_truth"]["lip_sync"]["num_clips"] == 3
    truth = gen["ground_truth"]["lip_sync"]  # the truth with the swap control's audio: the gap a run is read against
    assert truth["swapped"]["num_clips"] == 3 and truth["gap_lse_c"] == truth["lse_c"] - truth["swapped"]["lse_c"]
    assert (
        r["identity"]["num_frames"] == 3 * 2 if r["identity"]["status"] == "ok" else "dlib" in r["identity"]["reason"]
    )
    assert r["latency"]["frames"] == 48 and r["latency"]["ms_per_frame"]["denoiser"] > 0
    assert "per_talk" not in r and not (out / "tables" / "eval_generation_per_talk.csv").exists()  # one talk
    still = gen["baselines"]["reference_still"]  # the reference copied to every frame: no motion, no audio
    assert still["fidelity"]["num_frames"] == 48 and still["flicker"]["flicker_pred"] == 0
    assert still["mouth_motion"]["own"]["corr"] in (0.0, None) and still["lip_sync"]["gap_lse_c"] == 0
    assert "latency" not in still
    recon, take = gen["baselines"]["vae_reconstruction"], gen["baselines"]["synthetic_retake"]
    for oracle in (recon, take):  # made from the truth: no audio-swap control, no latency
        assert oracle["status"] == "ok" and oracle["fidelity"]["num_frames"] == 48 and "latency" not in oracle
        assert oracle["lip_sync"]["swapped"]["status"] == "unavailable"
        assert oracle["mouth_motion"]["swapped"]["status"] == "unavailable"
        assert oracle["mouth_motion"]["own"]["corr"] > 0.5  # the truth's own lips
    assert 18 < take["fidelity"]["full"]["psnr"] < 30  # the same face and lips with other head motion and blinks

    for kind, n_rows in (("generation", 7), ("denoise", 1 + 2 * 4)):
        rows = list(csv.DictReader((out / "tables" / f"eval_{kind}.csv").open()))
        assert len(rows) == n_rows
        if kind == "generation":  # each run's gap relative to the truth's
            rel = {row["run"]: row["lse_c_gap_rel"] for row in rows}
            assert float(rel["teacher@2"]) == pytest.approx(r["lip_sync"]["gap_lse_c"] / truth["gap_lse_c"], rel=1e-3)
            assert float(rel["ground_truth"]) == 1.0
        assert len((out / "tables" / f"eval_{kind}.md").read_text().splitlines()) == n_rows + 2
    targets = gen["targets"]  # the teacher's targets as measured now: against the retake, and the truth's gap
    assert set(targets) == {"teacher@1", "teacher@2"}
    t = targets["teacher@2"]
    upper = r["fidelity"]["upper_face"]["psnr"] - take["fidelity"]["upper_face"]["psnr"]
    assert t["upper_face_minus_retake_db"] == pytest.approx(upper) and t["upper_face_met"] == (upper >= 0)
    assert t["lse_c_gap_rel"] == pytest.approx(r["lip_sync"]["gap_lse_c"] / truth["gap_lse_c"])
    assert t["lse_c_gap_met"] == (t["lse_c_gap_rel"] >= 0.8)
    assert len(list(csv.DictReader((out / "tables" / "eval_targets.csv").open()))) == 2
    for name in ("metric_vs_steps", "quality_latency"):
        with Image.open(out / "plots" / f"{name}.png") as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
    assert not list(out.rglob(".*"))  # no temporary files left
    lines = key_numbers(out / "metrics" / "eval_report.json")  # tsd-pipeline's closing summary
    face = report["generation"].get("face_targets", [])  # where dlib reads the drawn lips: the real-face targets
    header = "real-face targets met (eval_face_targets.md):"
    assert len(face) == (len(lines) - lines.index(header) - 1 if face else 0)
    runs = lines[1 : lines.index(header)] if face else lines[1:]
    assert {line.split()[0] for line in runs} == {
        "teacher@1",
        "teacher@2",
        "reference_still",
        "vae_reconstruction",
        "synthetic_retake",
        "ground_truth",
    }
    assert all("mouth PSNR" in line and "swapped" in line for line in runs if "teacher" in line)
    assert "faster than teacher@2" in next(line for line in lines if "teacher@1" in line)  # the speed-up


def tiny_generation(exports, tmp_path) -> list[str]:
    """tsd-eval's generation protocol on two val utterances of 8 frames, the tiny teacher at 1 step, no dlib."""
    return [
        *tiny_eval("generation", exports, tmp_path / "out"),
        "eval.generation.max_frames=8",
        "eval.generation.identity.enabled=false",
        "eval.generation.lip_landmarks.enabled=false",
    ]


def field_overrides(exports, tmp_path) -> list[str]:
    """Two 20-frame clips, LSE over +-2 frames, no baselines: the field's nets cost seconds per clip on a CPU."""
    return [
        *tiny_generation(exports, tmp_path),
        "eval.generation.max_frames=20",
        "eval.generation.vshift=2",
        "eval.generation.baselines=[]",
    ]


def test_field_metrics_from_weights_files(exports, data_root, tmp_path):
    """Random-init nets in the published formats give numbers in every run's field section and the truth's LSE in
    syncnet_python's units; without the files each is unavailable, naming its file (checkpoints/field/ by default)."""
    overrides = field_overrides(exports, tmp_path)
    report = evaluate(compose_config("eval", overrides, data_root, tmp_path / "run"))["generation"]
    for metric, f in report["field"].items():
        assert f["status"] == "unavailable" and str(data_root / "checkpoints" / "field") in f["reason"], metric
    assert report["results"]["teacher@1"]["field"] == report["field"]
    rows = list(csv.DictReader((tmp_path / "out" / "tables" / "eval_field.csv").open()))
    assert [r["metric"] for r in rows] == ["syncnet_python", "csim", "fid", "fvd"]
    assert all(r["status"] == "unavailable" and "not found" in r["reason"] for r in rows)

    field = {  # FID's Inception: test_fid_in_tsd_eval
        "syncnet_python": save_syncnet(tmp_path / "syncnet_v2.model"),
        "arcface": save_arcface_onnx(tmp_path / "w600k_r50.onnx"),
        "i3d": save_i3d(tmp_path / "i3d_torchscript.pt"),
    }
    overrides += [f"eval.generation.field.{key}={path}" for key, path in field.items()]
    report = evaluate(compose_config("eval", overrides, data_root, tmp_path / "run"))["generation"]
    files = report["field"]
    assert all(files[m]["status"] == "ok" and len(files[m]["sha256"]) == 64 for m in ("syncnet_python", "csim", "fvd"))
    r = report["results"]["teacher@1"]["field"]
    sync = r["syncnet_python"]
    assert sync["own"]["num_clips"] == sync["swapped"]["num_clips"] == 2 and sync["weights"]["status"] == "ok"
    assert sync["gap_lse_c"] == pytest.approx(sync["own"]["lse_c"] - sync["swapped"]["lse_c"])
    truth = report["ground_truth"]["field_lip_sync"]
    assert truth["num_clips"] == 2 and truth["swapped"]["num_clips"] == 2 and truth["lse_c"] >= 0
    assert r["csim"]["num_frames"] == 40 and -1 <= r["csim"]["mean"] <= 1
    assert r["fvd"]["num_real"] == r["fvd"]["num_fake"] == 2 and r["fvd"]["fvd"] >= 0
    assert r["fvd"]["weights"]["sha256"] == files["fvd"]["sha256"] and r["fid"] == files["fid"]
    row = next(x for x in csv.DictReader((tmp_path / "out" / "tables" / "eval_generation.csv").open()))
    assert float(row["lse_c_syncnet"]) == pytest.approx(sync["own"]["lse_c"], rel=1e-3)
    assert float(row["fvd"]) == pytest.approx(r["fvd"]["fvd"], rel=1e-3) and row["fid"] == ""


def test_fid_in_tsd_eval(exports, data_root, tmp_path):
    pytest.importorskip("torch_fidelity")
    weights = save_fid_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    overrides = [*field_overrides(exports, tmp_path), f"eval.generation.field.inception={weights}"]
    fid = evaluate(compose_config("eval", overrides, data_root, tmp_path / "run"))["generation"]["results"]
    fid = fid["teacher@1"]["field"]["fid"]
    assert fid["status"] == "ok" and fid["num_real"] == fid["num_fake"] == 40 and fid["fid"] >= 0


def test_one_reference_image_for_every_clip(exports, data_root, tmp_path):
    """eval.generation.reference: a photo replaces each clip's reference frame (photo-in robustness checks)."""
    matplotlib = pytest.importorskip("matplotlib")
    photo = matplotlib.get_data_path() + "/sample_data/grace_hopper.jpg"

    def still_psnr(*extra: str) -> tuple[float, dict]:
        overrides = [
            *tiny_generation(exports, tmp_path),
            "eval.generation.pose_source=photo",
            "eval.generation.baselines=[reference_still]",
            *extra,
        ]
        cfg = compose_config("eval", overrides, data_root, tmp_path / "run")
        gen = evaluate(cfg)["generation"]
        return gen["baselines"]["reference_still"]["fidelity"]["full"]["psnr"], gen

    own, gen = still_psnr()
    other, gen_photo = still_psnr(f"eval.generation.reference={photo}")
    assert gen["reference"] == "each clip's own" and gen_photo["reference"] == photo
    assert gen_photo["results"]["teacher@1"]["status"] == "ok"
    assert other < own - 1  # another face, further from the truth
    with pytest.raises(SystemExit) as exit_info:  # the task wrapper: one line, exit 2
        still_psnr(f"eval.generation.reference={tmp_path / 'nope.png'}")
    assert exit_info.value.code == 2


def test_a_given_still_is_cropped_as_tsd_infer_crops_it(exports, data_root, tmp_path, monkeypatch):
    """The clips' references are prepared crops (taken as they are); a still given by eval.generation.reference is a
    photo, cropped to the face as tsd-infer and prepare crop one (eval.generation.reference_detector)."""
    from temposyncdiff.inference.pipeline import TalkingHeadPipeline

    matplotlib = pytest.importorskip("matplotlib")
    photo = matplotlib.get_data_path() + "/sample_data/grace_hopper.jpg"
    asked = []
    real = TalkingHeadPipeline.reference

    def reference(self, image, detector=None):
        asked.append((isinstance(image, str), detector or self.detector))
        return real(self, image, detector)

    monkeypatch.setattr(TalkingHeadPipeline, "reference", reference)
    base = [*tiny_generation(exports, tmp_path), "eval.generation.baselines=[]", "eval.generation.syncnet=null"]
    evaluate(compose_config("eval", base, data_root, tmp_path / "run"))
    assert asked and all(d == "center" for _, d in asked)  # each clip's own reference, a prepared crop
    asked.clear()
    evaluate(compose_config("eval", [*base, f"eval.generation.reference={photo}"], data_root, tmp_path / "run"))
    assert asked and all(is_path and d == "auto" for is_path, d in asked)
    with pytest.raises(SystemExit):
        evaluate(
            compose_config(
                "eval",
                [*base, f"eval.generation.reference={photo}", "eval.generation.reference_detector=nose"],
                data_root,
                tmp_path / "run",
            )
        )


def test_per_talk_scores_each_talk_apart(exports, data_root, tmp_path):
    """eval.generation.per_talk: every run and baseline also scored per talk (person), in the report and a table."""
    cfg = compose_config(
        "eval",
        [
            "eval=generation",
            "split=train",
            "max_utterances=4",
            f"vae={exports / 'vae_pretrained.pt'}",
            f"paths.outputs_dir={tmp_path / 'out'}",
            f"models.0.checkpoint={exports / 'teacher_best.pt'}",
            "models.0.steps=[1]",
            "models.1.steps=[]",
            "eval.generation.max_frames=8",
            "eval.generation.per_talk=true",
            "eval.generation.samples=1",
            "eval.generation.baselines=[reference_still]",
            "eval.generation.identity.enabled=false",
            "eval.generation.lip_landmarks.enabled=false",
            "eval.generation.syncnet=null",
            "threads=1",
        ],
        data_root,
        tmp_path / "run",
    )
    gen = evaluate(cfg)["generation"]
    talks = {u.split("/")[0] for u in (c.id for c in load_clips(cfg.manifest, 4))}
    assert len(talks) == 2
    for r in (gen["results"]["teacher@1"], gen["baselines"]["reference_still"]):
        assert set(r["per_talk"]) == talks
        assert sum(t["fidelity"]["num_frames"] for t in r["per_talk"].values()) == r["fidelity"]["num_frames"] == 32
        assert all(t["mouth_motion"]["own"].get("status") != "unavailable" for t in r["per_talk"].values())
    rows = list(csv.DictReader((tmp_path / "out" / "tables" / "eval_generation_per_talk.csv").open()))
    assert sorted((row["talk"], row["run"]) for row in rows) == sorted(
        (t, run) for t in talks for run in ("teacher@1", "reference_still")
    )
    psnr = {(row["talk"], row["run"]): float(row["psnr"]) for row in rows}
    per_talk = gen["results"]["teacher@1"]["per_talk"]
    assert all(psnr[t, "teacher@1"] == pytest.approx(per_talk[t]["fidelity"]["full"]["psnr"], rel=1e-3) for t in talks)
    samples = sorted((tmp_path / "out" / "samples" / "teacher@1").glob("*.mp4"))  # one per talk
    assert sorted(p.name.split("_")[0] for p in samples) == sorted(talks)
    for mp4 in samples:  # truth | own audio | swapped audio, with the clip's audio
        info = probe(mp4)
        assert (info.width, info.height, info.num_frames, info.audio_sample_rate) == (3 * 32, 32, 8, 16000)
    lines = key_numbers(tmp_path / "out" / "metrics" / "eval_report.json")
    talk_lines = lines[lines.index("per talk:") + 1 :]
    assert sorted(line.split()[:2] for line in talk_lines) == sorted([t, "teacher@1"] for t in talks)


@RunIf(modules=("dlib",))
def test_truth_lips_need_a_lip_net_and_a_known_mode(exports, data_root, tmp_path):
    """eval.generation.lips=truth: a net without lip shapes is reported unavailable; an unknown mode is an error."""
    base = [
        "eval=generation",
        "split=val",
        "max_utterances=1",
        f"vae={exports / 'vae_pretrained.pt'}",
        f"paths.outputs_dir={tmp_path / 'out'}",
        f"models.0.checkpoint={exports / 'teacher_best.pt'}",
        "models.0.steps=[1]",
        "models.1.steps=[]",
        "eval.generation.max_frames=8",
        "eval.generation.baselines=[]",
        "eval.generation.identity.enabled=false",
        "eval.generation.syncnet=null",
        "threads=1",
    ]
    gen = evaluate(compose_config("eval", [*base, "eval.generation.lips=truth"], data_root, tmp_path / "run"))
    r = gen["generation"]["results"]["teacher@1"]
    assert gen["generation"]["lips"] == "truth" and r["status"] == "unavailable" and "lip_dim=0" in r["reason"]
    with pytest.raises(SystemExit) as exit_info:
        evaluate(compose_config("eval", [*base, "eval.generation.lips=mouth"], data_root, tmp_path / "run"))
    assert exit_info.value.code == 2


def test_load_clips_reference_and_fallback(data_root, tmp_path):
    manifest = data_root / "data" / "manifests" / "synth_val.jsonl"
    clips = load_clips(manifest, None, max_frames=10)
    rows = read_manifest(manifest)
    assert len(clips) == len(rows) >= 2
    for c in clips:
        assert len(c.frames) == len(c.visemes) == 10 and len(c.wave) == 10 * 640
        assert c.reference_from.endswith("#0") and c.reference_from.split("#")[0] != c.id
        assert c.at(32).shape == (10, 32, 32, 3)
    single = tmp_path / "one_val.jsonl"  # a talk with one utterance: its own first frame
    single.write_text(manifest.read_text().splitlines()[0] + "\n")
    shutil.copy(data_root / "data" / "manifests" / "synth_meta.json", tmp_path / "one_meta.json")
    (clip,) = load_clips(single, 4)
    assert "no other utterance" in clip.reference_from and np.array_equal(clip.reference, clip.frames[0])


def test_baselines_refuse_what_they_cannot_make(data_root, tmp_path):
    (clip,) = load_clips(data_root / "data" / "manifests" / "synth_val.jsonl", 1, max_frames=4)
    clip.video = str(shutil.copy(clip.video, tmp_path / "own_video.mp4"))  # not in a synthetic corpus
    with pytest.raises(BaselineUnavailable, match="not an utterance of a synthetic corpus"):
        synthetic_retake(clip, None, None)
    cfg = OmegaConf.create({"eval": {"generation": {"baselines": ["reference_still", "mean_face"]}}})
    with pytest.raises(UserError, match=r"unknown eval.generation.baselines \['mean_face'\]"):
        evaluate_generation(cfg, [clip], {})


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp", "ddpm"])
@pytest.mark.parametrize("steps", [1, 3])
def test_denoise_from_with_exact_predictions_recovers_x0(sampler, steps):
    sch = NoiseSchedule()
    x0 = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0))

    def oracle(x_t, t, **cond):  # the v-prediction a perfect net makes for this x0
        ab = sch.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        return sch.target(x0, (x_t - ab.sqrt() * x0) / (1 - ab).sqrt(), t)

    x_t = sch.add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), torch.tensor([500]))
    cfg = {k: sch.scheduler.config[k] for k in SCHEDULE_KEYS}
    out = denoise_from(oracle, x_t, 500, {}, sampler, cfg, steps, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(out, x0, atol=1e-4)


def test_identical_videos_give_inf_psnr_and_ssim_one_in_report(tmp_path):
    video = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    scorer = GenerationScorer(face_regions(), lse_reason="no expert", identity_reason="no dlib")
    scorer.update(video, video.copy(), video[0], borders=[3])
    run = {"model": "oracle", "steps": 1, "status": "ok", **scorer.compute(), "latency": Timings().report(1.0)}
    report = {"generation": {"results": {"oracle@1": run}, "ground_truth": {"lip_sync": run["lip_sync"]}}}
    paths = write_outputs(report, tmp_path / "r.json", tmp_path / "tables", tmp_path / "plots")
    f = strict_json(paths["report"])["generation"]["results"]["oracle@1"]["fidelity"]
    for region in ("full", "mouth", "upper_face"):
        assert f[region]["psnr"] == "inf" and f[region]["ssim"] == pytest.approx(1.0, abs=1e-6)
    flick = strict_json(paths["report"])["generation"]["results"]["oracle@1"]["flicker"]
    assert flick["flicker_gap"] == 0.0
    row = next(csv.DictReader(paths["generation_csv"].open()))
    assert row["psnr"] == "inf" and float(row["ssim"]) == pytest.approx(1.0) and row["lse_c"] == ""


class LoudnessExpert:
    """Toy lip-sync expert: a window's embedding is its per-frame brightness (video) or loudness (audio) profile,
    centred and normalised, so a video whose brightness is an increasing affine map of the loudness matches exactly."""

    n_mels, frames, config = 8, 5, {"image_size": 32}

    def video_windows(self, frames):
        return frames.mean((1, 2, 3)).unfold(0, self.frames, 1)

    def audio_windows(self, mel):
        return mel.unflatten(-1, (-1, 4)).mean((0, 2)).unfold(0, self.frames, 1)

    def embed_video(self, x):
        return F.normalize(x - x.mean(1, keepdim=True), dim=1)

    embed_audio = embed_video


@pytest.mark.parametrize("shift", [0, 2, -3])
def test_known_shift_gives_known_lse_offset(shift):
    rng = np.random.default_rng(1)
    n = 40
    level = rng.integers(0, 256, n)
    mel = torch.tensor(np.repeat(level / 255.0, 4), dtype=torch.float32).expand(8, -1)  # loudness of frame t: level[t]
    gt = np.broadcast_to(level[:, None, None, None], (n, 32, 32, 3)).astype(np.uint8)
    own = gt[np.clip(np.arange(n) + shift, 0, n - 1)]  # frame t shows ground-truth frame t + shift
    other = rng.integers(0, 256, (n, 1, 1, 1)).repeat(32, 1).repeat(32, 2).repeat(3, 3).astype(np.uint8)
    scorer = GenerationScorer(face_regions(), LoudnessExpert(), identity_reason="no dlib", vshift=6)
    scorer.update(gt, own, gt[0], borders=[], mel=mel, swapped=other)
    truth = GenerationScorer(face_regions(), LoudnessExpert(), vshift=6)
    truth.update(gt, gt, gt[0], borders=[], mel=mel)
    ls, exact = scorer.compute()["lip_sync"], truth.compute()["lip_sync"]["own"]
    assert ls["own"]["clip_offset"] == [shift] and exact["clip_offset"] == [0]
    assert exact["lse_d"] == pytest.approx(0.0, abs=1e-3)  # identical profiles: distance 0 at the best offset
    assert ls["gap_lse_c"] > 0 and ls["gap_lse_d"] > 0  # another utterance's audio drives the video: worse sync


@RunIf(face_models=True)
def test_face_vs_itself_has_identity_cosine_one():
    import matplotlib

    face = np.asarray(
        Image.open(matplotlib.get_data_path() + "/sample_data/grace_hopper.jpg").convert("RGB").resize((96, 96))
    )
    video = np.stack([face, face])
    scorer = GenerationScorer(face_regions(), lse_reason="no expert", identity=identity.IdentitySimilarity())
    scorer.update(video, video, face, borders=[])
    ident = scorer.compute()["identity"]
    assert ident["status"] == "ok" and ident["num_frames"] == 2
    assert ident["mean"] == pytest.approx(1.0, abs=1e-6) and ident["mean_distance"] == pytest.approx(0.0, abs=1e-6)


def _scored(psnr_mouth: float, identity: float, flicker: float, truth_flicker: float, lips: dict | None) -> dict:
    """A generation report entry (a run's or a baseline's) with the numbers the real-face targets read."""
    region = {"psnr": 20.0, "ssim": 0.8}
    return {
        "status": "ok",
        "model": "student",
        "steps": 2,
        "latency": {"ms_per_frame": {"total": 10.0}},
        "fidelity": {"full": region, "mouth": {"psnr": psnr_mouth, "ssim": 0.7}, "upper_face": region},
        "lip_sync": {},
        "flicker": {"flicker_pred": flicker, "flicker_gap": flicker - truth_flicker},
        "seam": {},
        "identity": {"mean": identity},
        "lip_landmarks": lips or {},
    }


def test_face_targets_check_each_run_and_talk_against_the_baselines_and_the_truth(tmp_path):
    """eval_face_targets: lip correlation (own, swapped), mouth PSNR over the still's, identity over the VAE's,
    flicker over the truth's and the silence gap, each against its limit, per run and per talk; nothing for runs
    without landmark lip scores."""
    lips = {"own": {"corr": 0.45, "amplitude": 0.9}, "swapped": {"corr": 0.25}, "silence": {"gap": 0.004}}
    run = _scored(22.0, 0.94, 0.012, 0.010, lips)
    run["per_talk"] = {
        "ann": _scored(21.0, 0.90, 0.011, 0.010, {"own": {"corr": 0.30}, "swapped": {"corr": 0.1}}),
        "bob": _scored(23.0, 0.97, 0.013, 0.010, lips),
    }
    still, vae = _scored(20.0, 1.0, 0.0, 0.010, None), _scored(27.0, 0.96, 0.009, 0.010, None)
    still["per_talk"] = {"ann": _scored(20.0, 1.0, 0.0, 0.01, None), "bob": _scored(21.0, 1.0, 0.0, 0.01, None)}
    vae["per_talk"] = {"ann": _scored(27.0, 0.95, 0.009, 0.01, None), "bob": _scored(27.0, 1.0, 0.009, 0.01, None)}
    report = {
        "generation": {
            "results": {"student@2": run, "teacher@20": _scored(21.0, 0.9, 0.02, 0.01, None)},  # no lip scores
            "baselines": {"reference_still": still, "vae_reconstruction": vae},
            "ground_truth": {"lip_sync": {}},
        }
    }
    limits = {"lip_corr": 0.4, "lip_corr_swapped": 0.2, "mouth_over_still_db": 1.5, "identity_of_vae": 0.95,
              "flicker_of_truth": 1.2, "silence_gap": None}  # fmt: skip
    rows = {(r["talk"], r["run"]): r for r in face_targets(report, limits)}
    assert set(rows) == {("all", "student@2"), ("ann", "student@2"), ("bob", "student@2")}
    every = rows["all", "student@2"]
    assert every["lip_corr"] == 0.45 and every["lip_corr_met"] is True
    assert every["lip_corr_swapped"] == 0.25 and every["lip_corr_swapped_met"] is False
    assert every["mouth_over_still_db"] == pytest.approx(2.0) and every["mouth_over_still_db_met"] is True
    assert every["identity_of_vae"] == pytest.approx(0.94 / 0.96) and every["identity_of_vae_met"] is True
    assert every["flicker_of_truth"] == pytest.approx(1.2) and every["flicker_of_truth_met"] is True
    assert every["silence_gap"] == 0.004 and every["silence_gap_met"] is None  # its limit is null: reported only
    assert every["met"] == "4/5"
    ann = rows["ann", "student@2"]  # each talk against its own baselines; no silence in its clips
    assert ann["mouth_over_still_db"] == pytest.approx(1.0) and ann["mouth_over_still_db_met"] is False
    assert ann["identity_of_vae"] == pytest.approx(0.90 / 0.95) and ann["silence_gap"] is None
    assert ann["met"] == "2/5" and rows["bob", "student@2"]["mouth_over_still_db"] == pytest.approx(2.0)
    assert rows["bob", "student@2"]["flicker_of_truth"] == pytest.approx(1.3)  # 0.013 over 0.010: not met
    paths = write_outputs(
        report | {"generation": report["generation"] | {"face_targets": list(rows.values())}},
        tmp_path / "r.json",
        tmp_path / "tables",
        tmp_path / "plots",
    )
    table = list(csv.DictReader(paths["face_targets_csv"].open()))
    assert [(r["talk"], r["met"]) for r in table] == [("all", "4/5"), ("ann", "2/5"), ("bob", "3/5")]
    lines = key_numbers(tmp_path / "r.json")  # the recipe's closing summary
    ann_line = lines[lines.index("real-face targets met (eval_face_targets.md):") + 2].split()
    assert ann_line[:3] == ["ann", "student@2", "2/5"] and "lip_corr 0.3," in " ".join(ann_line)
    del report["generation"]["results"]["student@2"]["lip_landmarks"]  # drawn faces: no table
    assert face_targets(report, limits) == []
