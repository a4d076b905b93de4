"""stages.scoring: the one generate-and-score path of the stages and the ablation gives tsd-eval's scorer's numbers."""

from __future__ import annotations

import math

import torch

from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.diffusion.sampling import window_borders
from temposyncdiff.evaluation.scorer import GenerationScorer, flat_scores
from temposyncdiff.metrics.identity import as_uint8_frames
from temposyncdiff.stages.scoring import ScoreSettings, decode, score_runs
from tests.helpers.configs import face_regions
from tests.helpers.nets import tiny_vae

N = 10  # frames per utterance


def _utterances() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(2):
        frames = torch.rand(N, 3, 32, 32, generator=g) * 2 - 1
        out.append(
            {
                "id": f"talk/u{i}",
                "frames": frames,
                "mel": torch.randn(4 * N, 80, generator=g).numpy(),
                "visemes": torch.zeros(N, dtype=torch.long),
                "latents": None,
                "reference": frames[0],
                "ref_latent": None,
            }
        )
    return out


def redraw_pose(ref, mel, visemes, generator, pose):
    """Re-draws its pose source (the utterance's own frame latents): the VAE reconstruction, whatever the audio."""
    return pose.clone()


def still(ref, mel, visemes, generator, pose):
    """The reference in every frame."""
    return ref[:, None].expand(-1, mel.shape[1], -1, -1, -1).clone()


def test_score_runs_gives_the_scorers_numbers(tmp_path):
    vae, utts = tiny_vae().eval(), _utterances()
    settings = ScoreSettings(face_regions(), window=4, overlap=1, sample_videos=1)
    with torch.no_grad():
        scores = score_runs(
            {"rec": redraw_pose, "still": still}, utts, vae, AudioFeatures(), settings, video_dir=tmp_path
        )
        direct = GenerationScorer(face_regions())
        borders = window_borders(N, 4, 1)
        for u in utts:
            rec = as_uint8_frames(decode(vae, vae.to_latent(u["frames"])))
            direct.update(as_uint8_frames(u["frames"]), rec, None, borders, swapped=rec)
    expected = flat_scores(direct.compute())
    for key in ("psnr", "psnr_mouth", "ssim_upper_face", "flicker_gap", "mouth_corr", "seam_ratio"):
        assert math.isclose(scores["rec"][key], expected[key], rel_tol=1e-6), key
    rec, st = scores["rec"], scores["still"]
    assert rec["psnr_rec"] == math.inf and st["psnr_rec"] < 40  # vs the VAE reconstruction
    assert rec["psnr_mouth_gap"] == 0 and st["psnr_mouth_gap"] == 0  # neither listens to its audio
    assert "psnr_vs_ref" not in rec and st["psnr_vs_ref"] < 40  # vs the first run
    assert st["flicker_gap"] < rec["flicker_gap"]  # a still does not move
    assert len(list(tmp_path.glob("*.mp4"))) == 1  # sample_videos=1: truth | rec | still
