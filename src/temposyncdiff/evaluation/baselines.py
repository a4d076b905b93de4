"""Baselines scored like a run: the reference still, the VAE reconstruction, the synthetic corpus's retake."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from temposyncdiff.data.cache import resize_frames
from temposyncdiff.data.synthetic.corpus import FPS, retake
from temposyncdiff.data.video import read_frames, write_video
from temposyncdiff.errors import UserError
from temposyncdiff.evaluation.clips import Clip
from temposyncdiff.evaluation.denoise import chunked
from temposyncdiff.inference.inputs import ReferenceFace
from temposyncdiff.inference.pipeline import TalkingHeadPipeline, to_uint8
from temposyncdiff.metrics.image import (
    to_unit,
)


class BaselineUnavailable(Exception):
    """A baseline that cannot be made for these utterances (the reason is the message)."""


def reference_still(clip: Clip, face: ReferenceFace, pipe: TalkingHeadPipeline) -> np.ndarray:
    """The reference's face crop as every frame: what copying the reference scores."""
    return np.repeat(face.crop[None], len(clip.frames), axis=0)


def vae_reconstruction(clip: Clip, face: ReferenceFace, pipe: TalkingHeadPipeline) -> np.ndarray:
    """The truth through the VAE: the ceiling of every model that decodes with it."""
    gt = to_unit(clip.at(pipe.image_size)).mul(2).sub(1).to(pipe.device)
    return to_uint8(chunked(pipe.vae.from_latent, chunked(pipe.vae.to_latent, gt)))


def synthetic_retake(clip: Clip, face: ReferenceFace, pipe: TalkingHeadPipeline) -> np.ndarray:
    """The synthetic utterance drawn again with other head motion and blinks, through H.264 as the truth went.

    Exactly the right face, lips and speech-driven nod: what a perfect generator scores when it cannot know
    the take's head motion and blinks (random draws of the corpus, not in the audio or the reference).
    """
    try:
        frames = retake(clip.video)
    except (ValueError, UserError) as err:  # not a corpus utterance; no espeak-ng to speak it again
        raise BaselineUnavailable(f"{clip.id}: {err}") from err
    with tempfile.TemporaryDirectory() as tmp:
        write_video(Path(tmp) / "retake.mp4", frames, FPS, deterministic=True)
        decoded, _ = read_frames(Path(tmp) / "retake.mp4", FPS)
    return resize_frames(decoded, pipe.image_size).transpose(0, 2, 3, 1)


# name -> (its frames for a clip and its reference face, made without the clip's truth: then they are its audio-swap control's frames too)
BASELINES: dict[str, tuple[Callable[[Clip, ReferenceFace, TalkingHeadPipeline], np.ndarray], bool]] = {
    "reference_still": (reference_still, True),
    "vae_reconstruction": (vae_reconstruction, False),
    "synthetic_retake": (synthetic_retake, False),
}
