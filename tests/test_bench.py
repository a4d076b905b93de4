"""tsd-bench task=latency: rows per component and setting, FLOPs, outputs, runtime skips; the latency callback."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from temposyncdiff.bench import generation as lat
from temposyncdiff.cli.bench import latency, load_models, plan
from temposyncdiff.cli.common import compose_run
from temposyncdiff.errors import UserError
from temposyncdiff.nets.vae import TinyVAE
from temposyncdiff.training import train
from temposyncdiff.utils.timing import count_flops
from temposyncdiff.utils.weights import save_weights
from tests.helpers.configs import TINY_TEACHER as TINY_TEACHER
from tests.helpers.configs import TINY_VAE as TINY_VAE
from tests.helpers.configs import compose_config
from tests.helpers.run_if import RunIf

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny nets run on one intra-op thread


TINY_NET = ["channels=[8,16]", "cond_dim=16", "heads=2", "attention_levels=[1]", "cross_attention_levels=[1]",
            "temporal_levels=[0,1]", "audio_dim=16", "window=4", "audio_encoder.dim=16", "audio_encoder.width=16"]  # fmt: skip
TINY = ["bench.threads=[1]", "bench.batch_sizes=[1,2]", "bench.dtypes=[fp32,bf16]", "bench.runtimes=[eager]",
        "bench.warmup=0", "bench.repeats=2", "bench.peak_matmul_size=64", "bench.vae.image_size=32",
        "bench.vae.net.channels=[8]", "bench.models.teacher.steps=[2]", "bench.models.student.steps=[1,2]",
        "bench.models.teacher.overlap=1", "bench.models.student.overlap=1", "bench.restrict.end_to_end=null", "bench.restrict.compile=null",
        *(f"bench.models.{m}.net.{o}" for m in ("teacher", "student") for o in TINY_NET)]  # fmt: skip


def _bench_cfg(tmp_path, *extra: str):
    return compose_config("bench", [*TINY, *extra], tmp_path, tmp_path / "run")


def test_rows_for_every_component_and_setting_and_outputs(tmp_path):
    report = latency(_bench_cfg(tmp_path))
    rows = report["rows"]
    for model, steps in (("teacher", [2]), ("student", [1, 2])):
        for dtype in ("fp32", "bf16"):
            for batch in (1, 2):
                got = {
                    (r["component"], r["steps"])
                    for r in rows
                    if (r["model"], r["dtype"], r["batch"], r["threads"]) == (model, dtype, batch, 1)
                }
                want = {(c, None) for c in lat.COMPONENTS[:-1]} | {("end_to_end", n) for n in steps}
                assert got == want, (model, dtype, batch)
    for r in rows:
        assert r["repeats"] == 2 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["flops_per_frame"] > 0 and r["gflops"] > 0 and r["peak_gflops"] > 0
        assert r["frames"] == r["batch"] * 3  # window 4 - overlap 1 new frames per stream
    teacher = next(r for r in rows if r["model"] == "teacher" and r["component"] == "end_to_end")
    assert teacher["net_calls"] == 4  # 2 steps x 2 calls (guidance 2)
    assert {r["model"]: r["net_calls"] for r in report["summary"] if r["steps"] == 2} == {"teacher": 4, "student": 2}
    assert all(r["speedup"] == 1.0 for r in report["summary"] if r["model"] == "teacher")
    assert report["skipped"] == []

    out = tmp_path / "outputs"
    saved = json.loads((out / "metrics" / "latency.json").read_text())
    assert {"cpu", "cores", "torch", "date", "load_avg"} <= set(saved["machine"]) and saved["config"]["models"]
    table = (out / "tables" / "latency.md").read_text()
    assert table.index("## End to end") < table.index("## All rows") and "| teacher | end_to_end | 2 |" in table
    with Image.open(out / "plots" / "latency.png") as im:
        assert im.size[0] > 200 and im.size[1] > 200


@pytest.mark.slow  # ~40 s: ONNX export and onnxruntime timing rows (test_export checks the graphs)
def test_onnx_runtime_rows_match_eager_work(tmp_path):
    pytest.importorskip("onnxruntime")
    report = latency(
        _bench_cfg(
            tmp_path,
            "bench.runtimes=[eager,onnx]",
            "bench.batch_sizes=[1]",
            "bench.models.teacher.steps=[1]",
            "bench.components=[denoiser,end_to_end]",
            "bench.restrict.onnx=null",
        )
    )
    rows = {(r["model"], r["runtime"], r["dtype"], r["component"], r["steps"]): r for r in report["rows"]}
    for model in ("teacher", "student"):
        onnx, eager = rows[model, "onnx", "fp32", "end_to_end", 1], rows[model, "eager", "fp32", "end_to_end", 1]
        assert onnx["flops_per_frame"] == eager["flops_per_frame"] and onnx["median_ms"] > 0
        assert (model, "onnx", "bf16", "denoiser", None) not in rows
    reasons = {(s["model"], s["dtype"]): s["reason"] for s in report["skipped"] if s["runtime"] == "onnx"}
    assert reasons == {(m, "bf16"): "ValueError: onnx runs float32 graphs only" for m in ("teacher", "student")}


def test_failing_runtime_is_skipped_with_its_reason(tmp_path, monkeypatch):
    def broken(path):
        raise RuntimeError("no C++ compiler\nmore")

    monkeypatch.setitem(lat.RUNTIMES, "compile", broken)
    report = latency(
        _bench_cfg(
            tmp_path,
            "bench.runtimes=[eager,compile]",
            "bench.batch_sizes=[1]",
            "bench.dtypes=[fp32]",
            "bench.components=[decoder]",
        )
    )
    assert {(r["model"], r["runtime"]) for r in report["rows"]} == {("teacher", "eager"), ("student", "eager")}
    assert [(s["model"], s["runtime"], s["reason"]) for s in report["skipped"]] == [
        ("teacher", "compile", "RuntimeError: no C++ compiler"),
        ("student", "compile", "RuntimeError: no C++ compiler"),
    ]
    assert "skipped teacher compile" in (tmp_path / "outputs" / "tables" / "latency.md").read_text()


def test_plan_narrows_the_grid_per_component_and_runtime(tmp_path):
    bench = compose_run("bench", [f"paths.root_dir={tmp_path}"]).bench
    settings = plan(bench, torch.device("cpu"))
    threads = [s.threads for s in settings if s.runtime == "eager" and s.dtype == "fp32" and s.batch == 1]
    assert len(threads) == len(set(threads)) and set(threads) >= {1, 2}  # null (all cores) joins an equal count
    assert all("end_to_end" not in comps for s, comps in settings.items() if s.batch > 1)
    compiled = [s for s in settings if s.runtime == "compile"]
    assert compiled and all((s.batch, s.dtype) == (1, "fp32") for s in compiled)
    with pytest.raises(UserError, match="unknown runtime"):
        plan(compose_run("bench", ["bench.runtimes=[eager,tensorrt]"]).bench, torch.device("cpu"))
    quick = plan(compose_run("bench", ["bench=latency_cpu"]).bench, torch.device("cpu"))
    assert len(quick) == 1 and next(iter(quick.values())) == list(lat.COMPONENTS)


@pytest.mark.parametrize("model", ["teacher", "student"])
def test_bench_nets_are_the_quickstart_nets(model, tmp_path):
    bench = compose_run("bench", []).bench
    run = compose_run("train", [f"experiment=quickstart/{model}", f"paths.root_dir={tmp_path}"])
    mine = OmegaConf.to_container(bench.models[model].net, resolve=True)
    assert mine == OmegaConf.to_container(run.model.net, resolve=True)
    assert bench.models[model].guidance_scale == {"teacher": run.model.guidance_scale, "student": 1.0}[model]


def test_quickstart_student_needs_fewer_flops_than_the_teacher():
    models = load_models(compose_run("bench", []).bench, torch.device("cpu"))
    flops = {name: path.flops_per_frame(steps, torch.device("cpu")) for name, (path, steps, _) in models.items()}
    assert 0 < flops["student"]["denoiser", None] < 0.5 * flops["teacher"]["denoiser", None]
    assert flops["student"]["end_to_end", 4] < flops["teacher"]["end_to_end", 50] / 20


def test_end_to_end_flops_are_affine_in_the_steps(tmp_path):
    path, _, _ = load_models(_bench_cfg(tmp_path).bench, torch.device("cpu"))["teacher"]
    direct = count_flops(path.calls(lat.eager(path), path.inputs(1, torch.device("cpu")), [5])["end_to_end", 5])
    assert path.flops_per_frame([5], torch.device("cpu"))["end_to_end", 5] * path.frames == pytest.approx(direct)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_gpu_preset_without_cuda_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="CUDA"):
        latency(compose_config("bench", ["bench=gpu"], tmp_path, tmp_path / "run"))


@pytest.mark.gpu
@RunIf(cuda=True)
def test_gpu_rows_record_peak_memory(tmp_path):
    report = latency(_bench_cfg(tmp_path, "bench=gpu", "bench.runtimes=[eager]", "bench.batch_sizes=[1,8]"))
    assert report["rows"] and all(r["peak_mem_mb"] > 0 for r in report["rows"])


def test_callback_benchmarks_the_teacher_after_fit(data_root, tmp_path):
    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    save_weights(ckpt / "vae_pretrained.pt", "vae", TinyVAE(channels=(8,), latent_channels=4, patch_size=4), {})
    cfg = compose_config(
        "train",
        [
            *TINY_TEACHER,
            f"paths.checkpoint_dir={ckpt}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "callbacks=[default,latency]",
            "callbacks.latency.steps=[1,2]",
            "callbacks.latency.repeats=2",
            "callbacks.latency.warmup=0",
            "trainer.max_steps=1",
            "+trainer.limit_val_batches=0",
            "export=false",
        ],
        data_root,
        tmp_path / "run",
    )
    train(cfg)
    report = json.loads((tmp_path / "run" / "latency.json").read_text())
    assert report["stage"] == "TeacherStage"
    got = {(r["component"], r["steps"]) for r in report["rows"]}
    assert got == {(c, None) for c in lat.COMPONENTS[:-1]} | {("end_to_end", 1), ("end_to_end", 2)}
    header = next((tmp_path / "run" / "csv").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "latency/end_to_end@2_ms_per_frame" in header and "latency/decoder_ms_per_frame" in header


def test_callback_times_one_net_call_of_other_stages(data_root, tmp_path):
    cfg = compose_config(
        "train",
        [
            *TINY_VAE,
            "callbacks=[default,latency]",
            "callbacks.latency.repeats=2",
            "trainer.max_steps=1",
            "+trainer.limit_val_batches=0",
            "export=false",
        ],
        data_root,
        tmp_path / "run",
    )
    train(cfg)
    (row,) = json.loads((tmp_path / "run" / "latency.json").read_text())["rows"]
    assert row["component"] == "net" and row["batch"] == 4 and row["flops"] > 0 and row["median_ms"] > 0


def test_exports_bring_their_nets_and_sampler_settings(tmp_path):
    """The quickstart pipeline's bench step: exported weights for the VAE, teacher and student."""
    cfg = _bench_cfg(tmp_path)
    models = load_models(cfg.bench, torch.device("cpu"))
    teacher, student = models["teacher"][0], models["student"][0]
    with torch.no_grad():
        teacher.net.stem.weight.add_(1.0)  # not what random init gives
    meta = {"schedule": teacher.schedule, "sampler": "dpmpp", "guidance_scale": 3.0, "overlap": 2, "steps": 50}
    save_weights(tmp_path / "teacher.pt", "teacher", teacher.net, meta)
    save_weights(tmp_path / "student.pt", "student", student.net, meta | {"guidance_scale": 1.0})
    save_weights(tmp_path / "vae.pt", "vae", teacher.vae, {})
    cfg = _bench_cfg(
        tmp_path,
        f"bench.vae.weights={tmp_path / 'vae.pt'}",
        f"bench.models.teacher.weights={tmp_path / 'teacher.pt'}",
        f"bench.models.student.weights={tmp_path / 'student.pt'}",
    )
    loaded = load_models(cfg.bench, torch.device("cpu"))
    (path, steps, facts), student_path = loaded["teacher"], loaded["student"][0]
    assert (path.sampler, path.guidance_scale, path.calls_per_step, path.overlap, steps) == ("dpmpp", 3.0, 2, 2, [2])
    assert facts["weights"] == str(tmp_path / "teacher.pt") and student_path.calls_per_step == 1
    assert torch.equal(path.net.stem.weight, teacher.net.stem.weight)


@RunIf(modules=("dlib",))
def test_prepare_memory_rows_and_outputs(tmp_path):
    """task=prepare_memory on two tiny made-up videos: one child process each, peak RSS, outputs."""
    from temposyncdiff.cli.bench import prepare_memory

    cfg = compose_config(
        "bench",
        [
            "task=prepare_memory",
            "prepare_memory.seconds=[1.2,2.4]",
            "prepare_memory.heights=[240]",
            f"prepare_memory.work_dir={tmp_path}",
        ],
        tmp_path,
        tmp_path / "run",
    )
    report = prepare_memory(cfg)
    rows = report["rows"]
    assert [(r["seconds"], r["width"], r["height"], r["frames"]) for r in rows] == [
        (1.2, 426, 240, 30),
        (2.4, 426, 240, 60),
    ]
    for r in rows:
        assert r["rc"] == 0 and r["utterances"] == 1 and "error" not in r
        assert report["imports_rss_mb"] * 0.9 < r["peak_rss_mb"] < report["imports_rss_mb"] + 300 and r["cpu_s"] > 0
    assert set(report["growth_mb_per_min"]) == {240} and report["machine"]["cores"]
    assert json.loads((tmp_path / "outputs" / "metrics" / "prepare_memory.json").read_text())["rows"] == rows
    table = (tmp_path / "outputs" / "tables" / "prepare_memory.md").read_text()
    assert "| 426x240 | 2.4 | 60 |" in table and "MB per minute of video" in table
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("prepare_memory_")] == []  # videos removed


def test_precision_rows_per_image_size_with_psnr_and_peak_at_their_dtype(tmp_path):
    """bench=precision's rows: eager fp32 and a bfloat16 model at two image sizes (the second a VAE of its own),
    decoded frames' PSNR against eager fp32, the speed-up over it, and the CPU flags in the machine info."""
    cfg = _bench_cfg(
        tmp_path,
        "bench.runtimes=[eager,bf16]",
        "bench.dtypes=[fp32]",
        "bench.batch_sizes=[1]",
        "bench.image_sizes=[32,64]",
        "+bench.vae.sizes.64={channels:[8,8],patch_size:4}",
        "bench.components=[audio_encoder,decoder,end_to_end]",
        "bench.models.teacher=null",
    )
    report = latency(cfg)
    rows = {(r["image_size"], r["runtime"], r["component"], r["steps"]): r for r in report["rows"]}
    assert {k[:2] for k in rows} == {(s, rt) for s in (32, 64) for rt in ("eager", "bf16")}
    for size in (32, 64):
        bf16, fp32 = rows[size, "bf16", "end_to_end", 2], rows[size, "eager", "end_to_end", 2]
        assert bf16["dtype"] == "bf16" and bf16["psnr_db"] >= 40.0 and fp32["psnr_db"] is None  # None: identical
        assert (
            rows[size, "bf16", "decoder", None]["psnr_db"] >= 40.0
            and rows[size, "bf16", "audio_encoder", None]["psnr_db"] is None
        )
        assert bf16["peak_gflops"] == lat.matmul_peak("cpu", "bf16", 1, 64)
    summary = {(r["image_size"], r["runtime"]): r for r in report["summary"]}
    assert summary[64, "eager"]["vs_fp32"] == 1.0 and summary[64, "bf16"]["vs_fp32"] > 0
    assert set(report["models"]) == {"student 32 px", "student 64 px"}
    assert set(report["machine"]["cpu_flags"]) >= {"amx_bf16", "amx_int8", "avx512_bf16", "avx512f", "avx2"}
    with pytest.raises(UserError, match="unknown runtime"):
        plan(compose_run("bench", ["bench.runtimes=[eager,fp8]"]).bench, torch.device("cpu"))


def test_own_precision_runtimes_run_at_fp32_only(tmp_path):
    report = latency(
        _bench_cfg(tmp_path, "bench.runtimes=[bf16]", "bench.batch_sizes=[1]", "bench.components=[decoder]")
    )
    assert {r["dtype"] for r in report["rows"]} == {"bf16"}  # the setting's fp32: the model's own bf16, no autocast
    assert {s["reason"] for s in report["skipped"]} == {"ValueError: bf16 runs a bfloat16 model only"}


@pytest.mark.slow  # ~40 s: ONNX export, int8 quantization and onnxruntime timing rows
def test_int8_rows_quantize_the_export_and_stay_near_fp32(tmp_path):
    pytest.importorskip("onnxruntime")
    report = latency(
        _bench_cfg(
            tmp_path,
            "bench.runtimes=[int8]",
            "bench.dtypes=[fp32]",
            "bench.batch_sizes=[1]",
            "bench.components=[decoder,end_to_end]",
            "bench.models.teacher=null",
        )  # fmt: skip
    )
    rows = {(r["component"], r["steps"]): r for r in report["rows"]}
    assert rows["end_to_end", 2]["dtype"] == "int8" and rows["end_to_end", 2]["psnr_db"] >= 35.0
    assert rows["decoder", None]["peak_gflops"] > 0 and report["skipped"] == []
