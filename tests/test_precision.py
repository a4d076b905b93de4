"""Inference precisions and runtime=auto: each candidate's frames within its bound of float32 on tiny nets, the
fastest acceptable candidate chosen (injected timings) with every candidate's time and PSNR, the cache, tsd-infer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from temposyncdiff.cli.infer import infer
from temposyncdiff.inference import precision
from temposyncdiff.inference.pipeline import TalkingHeadPipeline
from temposyncdiff.inference.precision import CANDIDATES, Probe, psnr, use_runtime
from tests.helpers.configs import compose_config
from tests.helpers.nets import save_tiny_exports
from tests.helpers.run_if import RunIf

pytestmark = pytest.mark.usefixtures("one_thread")
BOUND_DB = {"onnx": 60.0, "bf16": 45.0, "int8": 40.0}  # tiny random nets measured: onnx identical, bf16 54, int8 46


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Tiny exports (32 px) and tsd-export's graphs of them in onnx/teacher beside them."""
    pytest.importorskip("onnxruntime")
    from temposyncdiff.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("ckpt")
    save_tiny_exports(out)
    export_onnx(out / "teacher_best.pt", out / "vae_pretrained.pt", out / "onnx" / "teacher", "teacher")
    return out


def _probe(exports, cache=None) -> Probe:
    pipe = TalkingHeadPipeline.from_checkpoints(exports / "teacher_best.pt", kind="teacher", detector="center")
    rng = np.random.default_rng(0)
    _, ref = pipe.reference(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    return Probe(pipe, ref, rng.normal(0, 0.1, 16000).astype(np.float32), threads=1, cache=cache)


def _fake_times(monkeypatch, ms: dict[str, float]) -> list[str]:
    """``measure`` with ``ms`` per frame for each candidate (the frames are real); returns the names measured."""
    calls = []

    def measure(name, run, repeats):
        calls.append(name)
        frames = run()
        return ms[name] * len(frames) / 1e3, frames

    monkeypatch.setattr(precision, "measure", measure)
    return calls


@pytest.mark.parametrize("name", ["onnx", "bf16", "int8"])
def test_each_precision_stays_within_its_bound_of_fp32(exports, name):
    probe = _probe(exports)
    fp32 = probe.window((probe.pipe.net, probe.pipe.vae))
    frames = probe.window(CANDIDATES[name].build(probe))
    assert frames.shape == fp32.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    assert psnr(frames, fp32) >= BOUND_DB[name]


def test_auto_picks_the_fastest_acceptable_candidate_and_records_why(exports, monkeypatch):
    calls = _fake_times(monkeypatch, {"torch": 10.0, "onnx": 8.0, "bf16": 3.0, "int8": 5.0})
    probe = _probe(exports)
    report = use_runtime(probe, "auto")
    assert report["chosen"] == "bf16" and report["cached"] is False and "fastest" in report["reason"]
    assert calls == ["torch", "onnx", "bf16", "int8"]
    rows = report["candidates"]
    assert {n: r["ms_per_frame"] for n, r in rows.items()} == {"torch": 10.0, "onnx": 8.0, "bf16": 3.0, "int8": 5.0}
    assert rows["torch"]["psnr_db"] is None and rows["bf16"]["psnr_db"] >= BOUND_DB["bf16"]
    assert all(r["accepted"] for r in rows.values())
    assert isinstance(probe.pipe.net, precision.LowPrecisionDenoiser)  # the pipeline now runs the choice
    json.dumps(report)


def test_a_candidate_below_the_psnr_bound_is_never_chosen(exports, monkeypatch):
    class Noisy(torch.nn.Module):  # the float32 VAE with a visible error in every decoded frame
        def __init__(self, vae):
            super().__init__()
            self.vae, self.downsample, self.latent_channels = vae, vae.downsample, vae.latent_channels

        def to_latent(self, x):
            return self.vae.to_latent(x)

        def from_latent(self, z):
            return (self.vae.from_latent(z) + 0.2).clamp(-1, 1)

    noisy = precision.Candidate(("cpu",), lambda probe: (probe.pipe.net, Noisy(probe.pipe.vae)))
    monkeypatch.setitem(CANDIDATES, "noisy", noisy)
    _fake_times(monkeypatch, {"torch": 10.0, "noisy": 1.0, "bf16": 20.0})
    report = use_runtime(_probe(exports), "auto", ["torch", "noisy", "bf16"])
    assert report["chosen"] == "torch"
    assert report["candidates"]["noisy"]["accepted"] is False
    assert (
        report["candidates"]["noisy"]["reason"].startswith("PSNR")
        and "< 40 dB" in report["candidates"]["noisy"]["reason"]
    )


def test_without_fast_bf16_auto_is_never_slower_than_fp32_eager(exports, monkeypatch):
    """The switch for a machine without fast bf16: candidates without it; measured, the pick is never slower."""
    report = use_runtime(_probe(exports), "auto", ["torch", "int8"], repeats=2)
    rows = report["candidates"]
    assert set(rows) == {"torch", "int8"} and report["chosen"] in rows
    assert rows[report["chosen"]]["ms_per_frame"] <= rows["torch"]["ms_per_frame"]
    _fake_times(monkeypatch, {"torch": 10.0, "int8": 12.0, "bf16": 1.0})  # bf16 would win, int8 is slower
    assert use_runtime(_probe(exports), "auto", ["torch", "int8"])["chosen"] == "torch"


def test_choice_is_cached_per_machine_and_model_and_a_corrupt_cache_is_rewritten(exports, monkeypatch, user_cache):
    calls = _fake_times(monkeypatch, {"torch": 10.0, "onnx": 2.0, "bf16": 3.0, "int8": 5.0})
    first = use_runtime(_probe(exports, user_cache), "auto")
    path = user_cache / json.loads(json.dumps(first))["cache_file"].rsplit("/", 1)[-1]
    assert first["chosen"] == "onnx" and not first["cached"] and path.is_file() and len(calls) == 4
    second = use_runtime(_probe(exports, user_cache), "auto")
    assert second["cached"] and second["chosen"] == "onnx" and second["candidates"] == first["candidates"]
    assert len(calls) == 4  # nothing measured again
    other = use_runtime(_probe(exports, user_cache), "auto", min_psnr=30.0)  # another rule: another entry
    assert not other["cached"] and other["cache_file"] != first["cache_file"] and len(calls) == 8
    path.write_bytes(b"\x80\x04\x95 not json")  # e.g. a pickle: never unpickled
    third = use_runtime(_probe(exports, user_cache), "auto")
    assert not third["cached"] and len(calls) == 12
    assert json.loads(path.read_text())["chosen"] == "onnx"  # rewritten


def test_tsd_infer_auto_records_its_choice(exports, synth_corpus, tmp_path, user_cache):
    mp4 = sorted(synth_corpus.glob("*/*.mp4"))[0]
    args = [
        f"ref_image={exports / 'ref.png'}",
        f"audio={mp4}",
        "stage=teacher",
        f"checkpoint={exports / 'teacher_best.pt'}",
        f"vae={exports / 'vae_pretrained.pt'}",
        f"onnx_dir={exports / 'onnx' / 'teacher'}",
        "detector=center",
        "runtime_repeats=1",
        "save_frames=false",
        "threads=1",  # threads=null follows how busy the other cores are, and so would the cache key
    ]
    from PIL import Image

    from temposyncdiff.data.video import read_frames

    Image.fromarray(read_frames(mp4)[0][0]).save(exports / "ref.png")
    for run in ("a", "b"):
        cfg = compose_config("infer", [*args, f"run_name={run}"], tmp_path, tmp_path / run)
        infer(cfg)
    first, second = (json.loads((tmp_path / "outputs" / "samples" / r / "summary.json").read_text()) for r in "ab")
    choice = first["runtime_choice"]
    assert first["runtime"] == choice["chosen"] and choice["requested"] == "auto" and not choice["cached"]
    assert set(choice["candidates"]) == {"torch", "onnx", "bf16", "int8"}
    assert all("ms_per_frame" in r and "psnr_db" in r for r in choice["candidates"].values())
    assert second["runtime_choice"]["cached"] and second["runtime"] == first["runtime"]
    assert second["runtime_choice"]["cache_file"].startswith(str(user_cache))


@pytest.mark.gpu
@RunIf(cuda=True)
@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_cuda_precisions_stay_within_their_bound(exports, name):
    pipe = TalkingHeadPipeline.from_checkpoints(
        exports / "teacher_best.pt", kind="teacher", detector="center", device="cuda"
    )
    rng = np.random.default_rng(0)
    _, ref = pipe.reference(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    probe = Probe(pipe, ref, rng.normal(0, 0.1, 16000).astype(np.float32))
    fp32 = probe.window((pipe.net, pipe.vae))
    assert psnr(probe.window(CANDIDATES[name].build(probe)), fp32) >= 40.0
