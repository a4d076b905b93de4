"""One scorer for every generated video: ``GenerationScorer`` accumulates a run's metrics clip by clip, ``TruthSync``
scores the ground truth's lip sync (the scale LSE is read on), and ``flat_scores`` turns a run's report into the flat
``name -> float`` that the stages log. tsd-eval, the stages' sampled validation and the student ablation all score
through these, so the same clip gives the same number everywhere."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from temposyncdiff.evaluation.report import gen_row, is_finite
from temposyncdiff.metrics.identity import IdentitySimilarity
from temposyncdiff.metrics.image import FidelityMetrics, json_float, to_unit, unavailable
from temposyncdiff.metrics.mouth import MouthOpening
from temposyncdiff.metrics.sync import LipSyncError, SyncExpert, SyncProtocol, embed_clip
from temposyncdiff.metrics.temporal import FlickerMetric, MouthMotion, seam_error
from temposyncdiff.regions import RegionBoxes

if TYPE_CHECKING:
    from temposyncdiff.evaluation.field import FieldScores

NO_SWAP = "no audio-swap control: it needs 2 utterances, and a baseline made from the truth has none"


def lse_summary(metric: LipSyncError) -> dict[str, Any]:
    """JSON-ready ``LipSyncError.compute()`` (means, counts, per-clip offsets)."""
    r = metric.compute()
    return {
        "lse_c": json_float(r["lse_c"]),
        "lse_d": json_float(r["lse_d"]),
        "offset_zero_frac": json_float(r["offset_zero_frac"]),
        "num_clips": int(r["num_clips"]),
        "num_skipped": int(r["num_skipped"]),
        "clip_offset": r["clip_offset"],
    }


def embed_frames(expert: SyncExpert, frames: Tensor | np.ndarray, audio: Tensor) -> tuple[Tensor, Tensor]:
    """``embed_clip`` of frames in any layout ``to_unit`` takes and the expert's audio input, on its device."""
    param = next(expert.parameters(), None) if isinstance(expert, nn.Module) else None
    dev = param.device if param is not None else torch.device("cpu")
    return embed_clip(expert, (to_unit(frames) * 2 - 1).to(dev), audio.to(dev))


def sync_report(own: LipSyncError, swapped: LipSyncError | None, no_swap: str = NO_SWAP) -> dict[str, Any]:
    """LSE with the own audio and the audio-swap control's, and their gaps (positive: the audio matters)."""
    out = {"own": lse_summary(own)}
    out["swapped"] = lse_summary(swapped) if swapped is not None and swapped.update_called else unavailable(no_swap)
    if out["own"]["num_clips"] and out["swapped"].get("num_clips"):
        out["gap_lse_c"] = json_float(out["own"]["lse_c"] - out["swapped"]["lse_c"])
        out["gap_lse_d"] = json_float(out["swapped"]["lse_d"] - out["own"]["lse_d"])
    return out


class TruthSync:
    """The ground truth's LSE with its own audio and with the audio-swap control's."""

    def __init__(self, expert: SyncExpert, vshift: int = 15, protocol: SyncProtocol = "temposyncdiff") -> None:
        self.expert = expert
        self.lse = {k: LipSyncError(vshift=vshift, protocol=protocol) for k in ("own", "swapped")}

    def update(self, frames: Tensor | np.ndarray, mel: Tensor, swapped_mel: Tensor | None = None) -> None:
        self.lse["own"].update(*embed_frames(self.expert, frames, mel))
        if swapped_mel is not None:
            self.lse["swapped"].update(*embed_frames(self.expert, frames, swapped_mel))

    def compute(self) -> dict[str, Any]:
        out = lse_summary(self.lse["own"])
        if self.lse["swapped"].update_called:
            out["swapped"] = lse_summary(self.lse["swapped"])
            if out["num_clips"] and out["swapped"]["num_clips"]:  # none when every clip was too short
                out["gap_lse_c"] = json_float(out["lse_c"] - out["swapped"]["lse_c"])
        return out


class GenerationScorer:
    """Every generation metric of one run, accumulated clip by clip (``update``) and reported (``compute``)."""

    def __init__(
        self,
        regions: RegionBoxes,
        expert: SyncExpert | None = None,
        lse_reason: str = "",
        identity: IdentitySimilarity | None = None,
        identity_reason: str = "",
        vshift: int = 15,
        identity_stride: int = 1,
        lips: MouthOpening | None = None,
        lips_reason: str = "no landmark model given",
        field: FieldScores | None = None,
    ) -> None:
        self.fidelity, self.fidelity_swapped = FidelityMetrics(regions), FidelityMetrics(regions)
        self.flicker, self.seams = FlickerMetric(), []
        self.motion = {k: MouthMotion(regions.mouth) for k in ("own", "swapped")}  # both against the own truth
        self.expert, self.lse_reason = expert, lse_reason
        self.lse = {k: LipSyncError(vshift=vshift) for k in ("own", "swapped")}
        self.identity, self.identity_reason, self.identity_stride = identity, identity_reason, identity_stride
        self.lips, self.lips_reason = lips, lips_reason
        self.field = field  # the field's metrics (evaluation.field), from the user's weights files

    def update(
        self,
        gt: np.ndarray,
        own: np.ndarray,
        reference: np.ndarray | None,
        borders: list[int],
        mel: Tensor | None = None,
        swapped: np.ndarray | None = None,
        wave: np.ndarray | None = None,
        clip_id: str | None = None,
    ) -> None:
        """One clip: ground truth, frames from its own audio and (optional) from another's, all uint8 ``[N,H,W,3]``;
        ``reference`` (the identity metric's face), ``mel`` (the own audio's log-mel, for LSE) and ``wave`` (its
        16 kHz audio: the silences of the lip-landmark metric) are needed by those metrics only."""
        self.fidelity.update(own, gt)
        if len(gt) > 1:
            self.flicker.update(own, gt)
        for key, video in (("own", own), ("swapped", swapped)):
            if video is not None:
                self.motion[key].update(video, gt)
                if self.expert is not None:
                    self.lse[key].update(*embed_frames(self.expert, video, mel))
        if swapped is not None:
            self.fidelity_swapped.update(swapped, gt)
        if borders:  # none when the clip fits in one window
            self.seams.append((seam_error(own, borders), seam_error(gt, borders)))
        if self.identity is not None:
            self.identity.update(reference, own[:: self.identity_stride])
        if self.lips is not None:
            self.lips.update(own, gt, wave, swapped, clip_id)
        if self.field is not None:
            self.field.update(gt, own, reference, wave, swapped)

    def compute(self) -> dict[str, Any]:
        no_swap = unavailable(NO_SWAP)
        swapped = self.motion["swapped"].update_called
        out = {
            "fidelity": self.fidelity.compute(),
            "flicker": self.flicker.compute(),
            "fidelity_swapped": self.fidelity_swapped.compute() if swapped else no_swap,
            "mouth_motion": {k: m.compute() if m.update_called else no_swap for k, m in self.motion.items()},
        }
        if self.seams:  # means over clips (of the finite ratios), as the stages log them
            out["seam"] = {
                f"{k}{sfx}": _mean(x[i][k] for x in self.seams)
                for i, sfx in ((0, ""), (1, "_gt"))
                for k in ("border", "inside", "ratio")
            }
            out["seam"]["num_clips"] = len(self.seams)
        else:
            out["seam"] = unavailable("every clip fits in one window: no window border")
        if self.expert is None:
            out["lip_sync"] = unavailable(self.lse_reason)
        else:
            out["lip_sync"] = sync_report(self.lse["own"], self.lse["swapped"])
        out["identity"] = self.identity.compute() if self.identity is not None else unavailable(self.identity_reason)
        out["lip_landmarks"] = self.lips.compute() if self.lips is not None else unavailable(self.lips_reason)
        if self.field is not None:
            out["field"] = self.field.compute()
        return out


def _mean(values: Iterable[Any]) -> float | None:
    finite = [v for v in values if is_finite(v)]
    return float(np.mean(finite)) if finite else None


def flat_scores(report: dict[str, Any]) -> dict[str, float]:
    """A run's report (``GenerationScorer.compute()``) as the table row's numbers (``gen_row``), floats only."""
    row = gen_row("", {"status": "ok", **report})
    return {k: float(v) for k, v in row.items() if isinstance(v, int | float) or v in ("inf", "-inf")}
