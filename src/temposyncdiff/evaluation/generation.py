"""The generation protocol: every utterance generated from its reference with its own and another's audio, scored
against the truth (``GenerationScorer``); baselines scored the same way."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from torch import Tensor

from temposyncdiff.data.audio import AudioFeatures
from temposyncdiff.data.video import write_side_by_side
from temposyncdiff.diffusion.sampling import window_borders
from temposyncdiff.errors import UserError
from temposyncdiff.evaluation.baselines import BASELINES, BaselineUnavailable
from temposyncdiff.evaluation.clips import Clip, swapped_inputs
from temposyncdiff.evaluation.field import FieldScores, field_files, load_field_syncnet
from temposyncdiff.evaluation.models import runs
from temposyncdiff.evaluation.report import gen_row, row_text
from temposyncdiff.evaluation.scorer import GenerationScorer, TruthSync
from temposyncdiff.inference.inputs import check_reference_file
from temposyncdiff.inference.pipeline import TalkingHeadPipeline, Timings
from temposyncdiff.metrics.identity import FaceEmbedder, IdentitySimilarity
from temposyncdiff.metrics.image import unavailable
from temposyncdiff.metrics.mouth import LipLandmarks, MouthOpening, interpolate_missing
from temposyncdiff.metrics.sync import SyncExpert
from temposyncdiff.nets.syncnet import load_expert
from temposyncdiff.regions import RegionBoxes
from temposyncdiff.utils.task import log


def _expert(g: DictConfig) -> tuple[SyncExpert | None, str]:
    if not g.syncnet or not Path(g.syncnet).is_file():
        return None, f"lip-sync expert not found: {g.syncnet}"
    return load_expert(g.syncnet), ""


def _embedder(g: DictConfig) -> tuple[FaceEmbedder | None, str]:
    if not g.identity.enabled:
        return None, "disabled (eval.generation.identity.enabled=false)"
    try:
        return FaceEmbedder(g.identity.weights_dir), ""
    except (ImportError, OSError, RuntimeError) as err:
        return None, str(err)


def _landmarks(g: DictConfig) -> tuple[LipLandmarks | None, str]:
    c = g.lip_landmarks
    if not c.enabled:
        return None, "disabled (eval.generation.lip_landmarks.enabled=false)"
    try:
        return LipLandmarks(c.weights_dir, c.min_side, c.detect_every), ""
    except (ImportError, OSError, RuntimeError) as err:
        return None, str(err)


def evaluate_generation(
    cfg: DictConfig, clips: list[Clip], models: dict[str, TalkingHeadPipeline | str]
) -> dict[str, Any]:
    """Each run generates every clip from its reference with its own audio (and another's: the audio-swap control)."""
    g = cfg.eval.generation
    if unknown := set(g.baselines) - set(BASELINES):
        raise UserError(f"unknown eval.generation.baselines {sorted(unknown)}; choose from {list(BASELINES)}")
    if g.pose_source not in ("video", "photo"):
        raise UserError(f"eval.generation.pose_source={g.pose_source!r}: choose video | photo")
    if g.lips not in ("head", "truth"):
        raise UserError(f"eval.generation.lips={g.lips!r}: choose head | truth")
    if g.reference is not None:
        check_reference_file(g.reference)
        if g.reference_detector not in ("auto", "dlib", "center"):
            raise UserError(f"eval.generation.reference_detector={g.reference_detector!r}: choose auto | dlib | center")
    regions = RegionBoxes(**cfg.regions)
    expert, lse_reason = _expert(g)
    embedder, identity_reason = _embedder(g)
    landmarks, lips_reason = _landmarks(g)
    field_syncnet = load_field_syncnet(g.field)  # syncnet_python's SyncNet when its weights are there
    if g.lips == "truth" and landmarks is None:
        raise UserError(f"eval.generation.lips=truth reads the truth's lip shapes with dlib: {lips_reason}")
    out: dict[str, Any] = {
        "ground_truth": {"lip_sync": unavailable(lse_reason)},
        "results": {},
        "reference": str(g.reference) if g.reference else "each clip's own",
        "lips": g.lips,
        "field": field_files(g.field),
    }
    mels: dict[str, Tensor] = {}
    if expert is not None:
        log_mel = AudioFeatures(n_mels=expert.n_mels).log_mel
        mels = {c.id: log_mel(c.wave) for c in clips}
        out["ground_truth"]["lip_sync"] = truth_sync(
            TruthSync(expert, g.vshift), clips, lambda c: c.at(expert.config["image_size"]), log_mel, mels
        )
    out["ground_truth"]["field_lip_sync"] = out["field"]["syncnet_python"]
    if field_syncnet is not None:  # the truth in syncnet_python's units (LSE-C about 7-8 on LRS2/LRS3 in papers)
        truth = TruthSync(field_syncnet, g.vshift, protocol="syncnet_python")
        mfcc = {c.id: field_syncnet.audio_features(c.wave) for c in clips}
        out["ground_truth"]["field_lip_sync"] = truth_sync(
            truth, clips, lambda c: c.frames, field_syncnet.audio_features, mfcc
        )

    stills: dict[int, tuple[Any, Tensor]] = {}  # the given still's crop and latent, once per pipeline

    def reference(pipe: TalkingHeadPipeline, clip: Clip) -> tuple[Any, Tensor]:
        """The clip's own reference (already a prepared crop) or the given still, cropped as tsd-infer crops one."""
        if g.reference is None:
            return pipe.reference(clip.reference)
        if id(pipe) not in stills:
            stills[id(pipe)] = pipe.reference(g.reference, detector=g.reference_detector)
        return stills[id(pipe)]

    def scorer_for(size: int, field: bool) -> GenerationScorer:
        reason = lse_reason
        if expert is not None and expert.config["image_size"] != size:
            reason = f"lip-sync expert takes {expert.config['image_size']} px frames, the model makes {size} px"
        identity = IdentitySimilarity(embedder=embedder) if embedder else None
        lips = None
        if landmarks is not None:
            c = g.lip_landmarks
            lips = MouthOpening(
                landmarks, min_face_frac=c.min_face_frac, silence_db=c.silence_db, silence_min_ms=c.silence_min_ms
            )
        return GenerationScorer(
            regions,
            None if reason else expert,
            reason,
            identity,
            identity_reason,
            g.vshift,
            g.identity.stride,
            lips,
            lips_reason,
            FieldScores(g.field, out["field"], field_syncnet, g.vshift) if field else None,
        )

    talks = sorted({c.talk for c in clips}) if g.per_talk else []
    talks = talks if len(talks) > 1 else []

    def scorers_for(size: int) -> dict[str | None, GenerationScorer]:
        """One scorer over every clip (key None, with the field's metrics) and, with per_talk, one per talk."""
        return {key: scorer_for(size, field=key is None) for key in [None, *talks]}

    def update(scorers: dict[str | None, GenerationScorer], talk: str, *args: Any) -> None:
        """Score a clip in the overall scorer and its talk's."""
        for key in (None, talk):
            if key in scorers:
                scorers[key].update(*args)

    def scored(scorers: dict[str | None, GenerationScorer]) -> dict[str, Any]:
        out = scorers.pop(None).compute()
        return out | ({"per_talk": {talk: s.compute() for talk, s in scorers.items()}} if scorers else {})

    for name, pipe, steps, info in runs(cfg, models):
        if g.lips == "truth" and not isinstance(pipe, str) and not getattr(pipe.net, "lip_dim", 0):
            pipe = "eval.generation.lips=truth: this net draws no lip shapes (model.net.lip_dim=0)"
        if isinstance(pipe, str):
            out["results"][name] = info | unavailable(pipe)
            continue
        size, scorers = pipe.image_size, scorers_for(pipe.image_size)
        pipe.steps, timings = steps, Timings()
        shown: dict[str, int] = {}  # side-by-side samples written per talk
        for i, clip in enumerate(clips):
            face, ref = reference(pipe, clip)
            truth = clip.at(size)
            pose = (lambda a, b, t=truth: t[a:b]) if g.pose_source == "video" else None  # re-voice the utterance
            lips = truth_lip_shapes(landmarks, truth) if g.lips == "truth" else None  # own audio only
            own = np.stack(
                list(pipe.frames(ref, clip.wave, clip.visemes if cfg.visemes == "data" else None, timings, pose, lips))
            )
            swapped = None
            if len(clips) > 1:
                wave, vis = swapped_inputs(clips, i)
                swapped = np.stack(list(pipe.frames(ref, wave, vis if cfg.visemes == "data" else None, pose=pose)))
            if shown.get(clip.talk, 0) < g.samples:
                shown[clip.talk] = shown.get(clip.talk, 0) + 1
                write_side_by_side(
                    Path(cfg.samples_dir) / name / f"{clip.id.replace('/', '_')}.mp4",
                    [truth, own] + ([swapped] if swapped is not None else []),
                    clip.wave,
                )
            borders = window_borders(len(own), pipe.window, pipe.overlap)
            update(scorers, clip.talk, truth, own, face.crop, borders, mels.get(clip.id), swapped, clip.wave, clip.id)
        seconds = sum(len(c.wave) for c in clips) / pipe.audio.sample_rate
        out["results"][name] = info | {"status": "ok", **scored(scorers), "latency": timings.report(seconds)}
        log.info("generation %s: %s", name, row_text(gen_row(name, out["results"][name])))
    pipe = next((p for p in models.values() if not isinstance(p, str)), None)
    if pipe is not None and g.baselines:
        out["baselines"] = {}
        faces = [reference(pipe, clip)[0] for clip in clips]  # once for every baseline
        for name in g.baselines:
            make, truth_free = BASELINES[name]
            try:
                frames = [make(clip, face, pipe)[: len(clip.frames)] for clip, face in zip(clips, faces)]
            except BaselineUnavailable as err:
                out["baselines"][name] = {"model": name, "kind": "baseline"} | unavailable(str(err))
                log.info("generation baseline %s: unavailable (%s)", name, err)
                continue
            scorers = scorers_for(pipe.image_size)
            for clip, face, video in zip(clips, faces, frames):
                gt = clip.at(pipe.image_size)
                borders = window_borders(len(gt), pipe.window, pipe.overlap)
                swap = video if truth_free else None
                update(scorers, clip.talk, gt, video, face.crop, borders, mels.get(clip.id), swap, clip.wave, clip.id)
            out["baselines"][name] = {"model": name, "kind": "baseline", "status": "ok", **scored(scorers)}
            log.info("generation baseline %s: %s", name, row_text(gen_row(name, out["baselines"][name])))
    return out


def truth_sync(
    truth: TruthSync,
    clips: list[Clip],
    frames: Callable[[Clip], np.ndarray],
    audio: Callable[[np.ndarray], Tensor],
    own: dict[str, Tensor],
) -> dict[str, Any]:
    """``truth``'s LSE of every clip's truth ``frames(clip)`` with its own audio (``own[clip.id]``, the expert's audio
    input) and with the swap control's (``audio(wave)`` makes that input)."""
    for i, c in enumerate(clips):
        swapped = audio(swapped_inputs(clips, i)[0]) if len(clips) > 1 else None
        truth.update(frames(c), own[c.id], swapped)
    return truth.compute()


def truth_lip_shapes(landmarks: LipLandmarks, frames: np.ndarray) -> np.ndarray | None:
    """The truth's per-frame lip shapes ``[T, 3]`` as the cache measures them (gaps interpolated); None: no face."""
    track, _ = landmarks.truth(frames)
    shapes = interpolate_missing(landmarks.shapes(frames, track.boxes))
    return None if np.isnan(shapes[:, 0]).all() else shapes
