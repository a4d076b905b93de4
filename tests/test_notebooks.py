"""The notebooks run top to bottom on tiny data (parameters injected after their ``parameters`` cell), and are
committed without outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from temposyncdiff.nets.vae import TinyVAE
from temposyncdiff.training import train
from temposyncdiff.utils.weights import save_weights
from tests.helpers.configs import REPO, compose_config
from tests.helpers.configs import TINY_TEACHER as TINY

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.slow  # ~9 s per notebook, executed in a kernel
NOTEBOOKS = REPO / "notebooks"


def run_notebook(name: str, tmp: Path, **params) -> list:
    """Execute ``notebooks/<name>`` in its folder (as Jupyter would), temporary files under ``tmp``, with ``params``
    overriding its parameters."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    (at,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items())))
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute(
        env={
            **os.environ,
            "TMPDIR": str(tmp),
            "OMP_NUM_THREADS": "1",
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        }
    )
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def text(outputs: list) -> str:
    return "".join(o.get("text", "") + o.get("data", {}).get("text/markdown", "") for o in outputs)


def images(outputs: list) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_notebooks_have_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.outputs and c.execution_count is None for c in nb.cells if c.cell_type == "code")


def test_explore_corpus_notebook(tmp_path):
    outputs = run_notebook("01_explore_corpus.ipynb", tmp_path)  # synthesises its own tiny corpus
    assert "2 utterances" in text(outputs) and "visemes match the ground truth" in text(outputs)
    assert images(outputs) == 2  # frames; mel + words + viseme tracks


def test_read_a_run_notebook(data_root, tmp_path, one_thread):
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    save_weights(
        ckpt / "vae_pretrained.pt",
        "vae",
        TinyVAE(channels=(8,), latent_channels=4, patch_size=4),
        {"scale_factor": 1.0},
    )
    train(
        compose_config(
            "train",
            [*TINY, "export=false", f"paths.checkpoint_dir={ckpt}", f"data.cache_dir={tmp_path / 'cache'}"],
            data_root,
            run,
        )
    )
    gt_lse = {"lse_c": 3.0, "lse_d": 8.0}
    result = {
        "status": "ok",
        "steps": 2,
        "sampler": "ddim",
        "lip_sync": {},
        "fidelity": {r: {"psnr": 20.0, "ssim": 0.5} for r in ("full", "mouth", "upper_face")},
        "flicker": {"flicker_pred": 0.01, "flicker_gap": 0.0},
        "seam": {},
        "identity": {},
        "latency": {"ms_per_frame": {"total": 5.0}, "real_time_factor": 0.1},
    }
    report = tmp_path / "out" / "metrics" / "eval_report.json"
    report.parent.mkdir(parents=True)
    report.write_text(
        json.dumps({"generation": {"results": {"student@2": result}, "ground_truth": {"lip_sync": gt_lse}}})
    )

    outputs = run_notebook("02_read_a_run.ipynb", tmp_path, run_dir=str(run), eval_report=str(report))
    assert "1 sample videos at step 2" in text(outputs) and "| student@2 | 2 | ddim |" in text(outputs)
    assert any("text/html" in o.get("data", {}) and "<video" in o["data"]["text/html"] for o in outputs)
    assert images(outputs) == 2  # curves; sample frames
