"""Long-video drift (``tsd-eval eval=long``): one generation, ``duration_s`` long, from the held-out utterances' audio
joined end to end, read in ``block_s`` blocks: identity cosine to the reference, colour statistics against the first
block, window seams, and the process's memory. Frames stream through the scorer (and the mp4 writer): only one
block is held at a time, so memory stays flat when nothing leaks."""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from temposyncdiff.data.video import write_video
from temposyncdiff.diffusion.sampling import window_borders
from temposyncdiff.errors import UserError
from temposyncdiff.evaluation.clips import Clip
from temposyncdiff.evaluation.models import runs
from temposyncdiff.inference.inputs import check_reference_file
from temposyncdiff.inference.pipeline import TalkingHeadPipeline, Timings, num_output_frames
from temposyncdiff.metrics.identity import FaceEmbedder
from temposyncdiff.metrics.image import unavailable
from temposyncdiff.metrics.temporal import seam_error
from temposyncdiff.utils.task import log


def rss_mb() -> float:
    """This process's resident memory now (Linux ``/proc``), else its peak (``ru_maxrss``), in MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if sys.platform == "darwin" else 2**10)


def joined_audio(clips: list[Clip], seconds: float, sample_rate: int = 16000) -> tuple[np.ndarray, list[str]]:
    """The clips' audio end to end, repeated from the first until ``seconds`` long; and the ids in order."""
    if not clips:
        raise UserError("eval=long: no utterances to take audio from")
    need, parts, ids = int(round(seconds * sample_rate)), [], []
    while sum(map(len, parts)) < need:
        clip = clips[len(parts) % len(clips)]
        parts.append(clip.wave)
        ids.append(clip.id)
    return np.concatenate(parts)[:need].astype(np.float32), ids


class DriftBlocks:
    """Per-block statistics of a streamed video: ``add(frame)`` each frame, ``rows`` when the stream ends."""

    def __init__(
        self,
        block_frames: int,
        fps: float,
        borders: list[int],
        embedder: FaceEmbedder | None,
        reference: np.ndarray,
        stride: int = 5,
    ) -> None:
        self.block_frames, self.fps, self.borders, self.stride = block_frames, fps, borders, stride
        self.embedder = embedder
        self.ref_emb = embedder.embed(reference) if embedder is not None else None
        self.frames: list[np.ndarray] = []
        self.start, self.rows = 0, []

    def add(self, frame: np.ndarray) -> None:
        self.frames.append(frame)
        if len(self.frames) == self.block_frames:
            self.close_block()

    def close_block(self) -> None:
        """Score the frames held (a block, or the last partial one) and drop them."""
        if not self.frames:
            return
        video, a = np.stack(self.frames), self.start
        b = a + len(video)
        mean = video.reshape(-1, 3).mean(0)
        row: dict[str, Any] = {"t0_s": a / self.fps, "t1_s": b / self.fps}
        row |= dict(zip(("red", "green", "blue"), mean.tolist()))
        row["contrast"] = float(video.astype(np.float32).mean(-1).std())  # luminance std over the block's pixels
        first = self.rows[0] if self.rows else row
        row["colour_shift"] = float(np.linalg.norm(mean - [first["red"], first["green"], first["blue"]]))
        if self.ref_emb is not None:
            emb = np.stack([self.embedder.embed(f) for f in video[:: self.stride]])
            cos = emb @ self.ref_emb / (np.linalg.norm(emb, axis=1) * np.linalg.norm(self.ref_emb))
            row |= {"identity": float(cos.mean()), "identity_min": float(cos.min())}
        inside = [x - a for x in self.borders if a < x < b]  # a border at a block's first frame has no pair in it
        row["seam_ratio"] = seam_error(video, inside)["ratio"] if inside and len(video) > 2 else None
        row["rss_mb"] = round(rss_mb(), 1)
        self.rows.append(row)
        self.start, self.frames = b, []


def _slope_per_minute(rows: list[dict], key: str) -> float | None:
    points = [((r["t0_s"] + r["t1_s"]) / 2, r[key]) for r in rows if isinstance(r.get(key), float)]
    if len(points) < 2:
        return None
    t, y = np.array(points).T
    return float(np.polyfit(t / 60, y, 1)[0])


def drift_summary(rows: list[dict]) -> dict[str, Any]:
    """First vs last block and the linear trend per minute of identity, colour and memory."""
    first, last = rows[0], rows[-1]
    out: dict[str, Any] = {
        "colour_shift_max": max(r["colour_shift"] for r in rows),
        "colour_shift_per_min": _slope_per_minute(rows, "colour_shift"),
        "rss_growth_mb": round(last["rss_mb"] - first["rss_mb"], 1),
        "rss_per_min_mb": _slope_per_minute(rows, "rss_mb"),
    }
    if "identity" in first:
        out |= {
            "identity_first": first["identity"],
            "identity_last": last["identity"],
            "identity_min": min(r["identity_min"] for r in rows),
            "identity_per_min": _slope_per_minute(rows, "identity"),
        }
    seams = [r["seam_ratio"] for r in rows if isinstance(r["seam_ratio"], float)]
    out["seam_ratio_mean"] = float(np.mean(seams)) if seams else None
    return out


def _run(cfg: DictConfig, models: dict[str, TalkingHeadPipeline | str], name: str) -> TalkingHeadPipeline | str:
    for run, pipe, steps, _ in runs(cfg, models):
        if run == name:
            if not isinstance(pipe, str):
                pipe.steps = steps
            return pipe
    choices = [run for run, *_ in runs(cfg, models)]
    raise UserError(f"eval.long.run={name}: not one of the runs {choices} (models.<i>.steps)")


def evaluate_long(cfg: DictConfig, clips: list[Clip], models: dict[str, TalkingHeadPipeline | str]) -> dict[str, Any]:
    """Generate ``eval.long.duration_s`` of video with one run and score it block by block."""
    c = cfg.eval.long
    if c.duration_s <= 0 or c.block_s <= 0:
        raise UserError(f"eval.long: duration_s and block_s must be positive, got {c.duration_s}, {c.block_s}")
    if c.reference is not None:
        check_reference_file(c.reference)
    pipe = _run(cfg, models, c.run)
    if isinstance(pipe, str):
        return {"run": c.run} | unavailable(pipe)
    sr, fps = pipe.audio.sample_rate, pipe.audio.fps
    wave, ids = joined_audio(clips, c.duration_s, sr)
    # a given still is cropped as tsd-infer crops a photo; a clip's frame is already a prepared crop
    face, ref = pipe.reference(c.reference, detector="auto") if c.reference else pipe.reference(clips[0].reference)
    embedder, identity = None, unavailable("disabled (eval.long.identity.enabled=false)")
    if c.identity.enabled:
        try:
            embedder, identity = FaceEmbedder(c.identity.weights_dir), None
        except (ImportError, OSError, RuntimeError) as err:
            identity = unavailable(str(err))
    total = num_output_frames(len(wave), sr, fps)
    blocks = DriftBlocks(
        max(1, round(c.block_s * fps)),
        fps,
        window_borders(total, pipe.window, pipe.overlap),
        embedder,
        face.crop,
        c.identity.stride,
    )
    timings = Timings()
    chunks = (wave[i : i + sr] for i in range(0, len(wave), sr))  # one second at a time, as a live stream arrives

    def scored() -> Iterator[np.ndarray]:
        for frame in pipe.frames(ref, chunks, None, timings):
            blocks.add(frame)
            yield frame
        blocks.close_block()

    video = None
    if c.video:
        video = Path(cfg.samples_dir) / "long" / f"{c.run.replace('/', '_')}.mp4"
        write_video(video, scored(), fps, wave, sr)
    else:
        for _ in scored():
            pass
    out = {
        "run": c.run,
        "status": "ok",
        "seconds": len(wave) / sr,
        "num_frames": timings.frames,
        "block_s": float(c.block_s),
        "audio_from": ids,
        "reference": str(c.reference) if c.reference is not None else clips[0].reference_from,
        "identity": identity or {"status": "ok", "stride": int(c.identity.stride)},
        "blocks": blocks.rows,
        "summary": drift_summary(blocks.rows),
        "latency": timings.report(len(wave) / sr),
        "video": str(video) if video else None,
    }
    log.info("long %s: %d frames, %s", c.run, timings.frames, out["summary"])
    return out
