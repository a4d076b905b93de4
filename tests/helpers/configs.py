"""Configs as the entry points compose them, and each stage's tiny overrides (seconds of CPU per run)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_LOADER = "data.num_workers=0 data.persistent_workers=false data.cache_workers=1 ~callbacks.rich_progress_bar "
_NET = (
    "model.net.cond_dim=16 model.net.heads=2 model.net.attention_levels=[1] model.net.cross_attention_levels=[1] "
    "model.net.temporal_levels=[0,1] model.net.audio_encoder.dim=16 model.net.audio_encoder.width=16 "
)
TINY_VAE = (
    "experiment=quickstart/vae data.batch_size=4 data.val_max_items=8 trainer.log_every_n_steps=1 "
    "trainer.num_sanity_val_steps=0 trainer.deterministic=true model.net.channels=[16] model.log_images=0 " + _LOADER
).split()
TINY_TEACHER = (
    "experiment=quickstart/teacher data.batch_size=2 data.clip_len=4 data.val_max_items=2 trainer.log_every_n_steps=1 "
    "trainer.num_sanity_val_steps=0 trainer.max_steps=2 trainer.val_check_interval=2 model.net.channels=[8,16] "
    "model.steps=2 model.overlap=1 model.val_utterances=2 model.sample_videos=1 model.temporal_weight=0.1 "
    "model.identity_weight=0.1 model.mouth_weight=2.0 " + _LOADER + _NET
).split()
TINY_STUDENT = (
    "experiment=quickstart/student data.batch_size=2 data.clip_len=4 data.stride=8 data.val_max_items=2 "
    "trainer.log_every_n_steps=1 trainer.num_sanity_val_steps=0 trainer.max_steps=2 trainer.val_check_interval=2 "
    "model.net.channels=[8,8] model.net.audio_encoder.context=1 model.teacher_steps=2 model.teacher_eval_steps=2 "
    "model.val_steps=[1,2] model.val_frames=6 model.val_utterances=2 model.sample_videos=1 model.coupling_batch=32 "
    + _LOADER
    + _NET
).split()
TINY_SYNCNET = (
    "experiment=quickstart/syncnet debug=fdr data.batch_size=4 data.clip_len=12 data.cache_workers=1 "
    "model.net.width=8 model.net.dim=16 model.lse_vshift=3 ~callbacks.rich_progress_bar"
).split()


def tiny_eval(protocol: str, exports: Path, out_dir: Path) -> list[str]:
    """tsd-eval ``eval=<protocol>`` over two val utterances with the tiny teacher of ``exports`` at 1 step."""
    return [
        f"eval={protocol}",
        "split=val",
        "max_utterances=2",
        f"vae={exports / 'vae_pretrained.pt'}",
        f"paths.outputs_dir={out_dir}",
        f"models.0.checkpoint={exports / 'teacher_best.pt'}",
        "models.0.steps=[1]",
        "models.1.steps=[]",
        "threads=1",
    ]


def face_regions():
    """The project's regions as the configs give them (conf/regions/face.yaml, the one place they are written)."""
    from omegaconf import OmegaConf

    from temposyncdiff.regions import RegionBoxes

    return RegionBoxes(**OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "regions" / "face.yaml")))


def compose_config(config_name: str, overrides: list[str], root: Path, run_dir: Path):
    """Compose an entry config as Hydra would for a run in ``run_dir`` (so ${hydra:...} resolves), under ``root``."""
    from temposyncdiff.cli.common import compose_run

    return compose_run(config_name, [f"paths.root_dir={root}", "extras.print_config=false", *overrides], run_dir)
