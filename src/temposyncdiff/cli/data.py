"""tsd-data <command> [key=value ...]: synth | manifest | prepare | visemes | cache | shards."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from temposyncdiff.cli.common import hydra_main
from temposyncdiff.utils.task import EXIT_USER_ERROR, log, task

COMMANDS = ("synth", "manifest", "prepare", "visemes", "cache", "shards")


def synth(cfg: DictConfig) -> dict:
    from temposyncdiff.data.synthetic.corpus import SynthConfig, synthesize_corpus

    settings = SynthConfig(**{k: cfg[k] for k in SynthConfig.__dataclass_fields__})
    return synthesize_corpus(settings, overwrite=cfg.overwrite, log=log.info)


def manifest(cfg: DictConfig) -> dict:
    from temposyncdiff.data.manifest import build_manifest

    return build_manifest(
        cfg.root,
        cfg.out_dir,
        name=cfg.name,
        layout=cfg.layout,
        viseme_root=cfg.viseme_root,
        val_ratio=cfg.val_ratio,
        test_ratio=cfg.test_ratio,
        seed=cfg.seed,
        split_by=cfg.split_by,
        workers=cfg.workers,
        log=log.info,
    )


def prepare(cfg: DictConfig) -> dict:
    from dataclasses import fields

    from temposyncdiff.data.prepare import PrepareSettings, prepare_videos

    settings = PrepareSettings(**{f.name: cfg[f.name] for f in fields(PrepareSettings)})
    return prepare_videos(cfg.inputs, cfg.out, settings, log=log.info)


def visemes(cfg: DictConfig) -> dict:
    from temposyncdiff.data.transcript_visemes import write_viseme_files

    keys = ("fps", "overwrite", "source", "align_text")
    return write_viseme_files(cfg.root, cfg.viseme_root, log=log.info, **{k: cfg[k] for k in keys})


def cache(cfg: DictConfig) -> dict:
    """Build or reuse the frame/mel/viseme cache of data=<corpus>; with vae=<file>, add its latents (with
    data.mirror > 0, also the training frames' mirrored ones); with lips=true, the frames' landmark lip shapes.

    Builds the cache whatever data.format/use_cache say for training; no manifest of data.name is an error.
    """
    from pathlib import Path

    from temposyncdiff.data.cache import add_latents, add_lips
    from temposyncdiff.data.datamodule import SPLITS, DataConfigError
    from temposyncdiff.utils.weights import load_net

    vae, meta = load_net(cfg.vae, "vae") if cfg.vae else (None, {})  # a bad vae= fails before the cache is built

    # plain types: checkpoints stay weights-only loadable
    datamodule = hydra.utils.instantiate(cfg.data, format="cache", use_cache=True, _convert_="all")
    splits = []
    for split in SPLITS:
        try:
            datamodule.rows(split)
            splits.append(split)
        except DataConfigError:
            continue  # no or empty manifest: prepare_data skips it too
    if not splits:
        hp = datamodule.hparams
        names = sorted({p.stem.rsplit("_", 1)[0] for s in SPLITS for p in Path(hp.manifest_dir).glob(f"*_{s}.jsonl")})
        raise DataConfigError(
            f"{hp.manifest_dir}: no manifest of data.name={hp.name} ({hp.name}_{{train,val,test}}.jsonl missing or "
            f"empty); " + (f"names there: {', '.join(names)}" if names else "run tsd-data manifest first")
        )
    datamodule.prepare_data()
    if vae is not None:
        encoder = f"vae:{meta.get('sha256', cfg.vae)}"
        for split in splits:
            mirror = split == "train" and datamodule.hparams.mirror > 0  # data.mirror: training items mirrored
            add_latents(
                datamodule.cache_path(split),
                vae.to_latent,
                cfg.latent_batch_size,
                encoder=encoder,
                log=log.info,
                mirror=mirror,
            )
    if cfg.lips:
        for split in splits:
            add_lips(datamodule.cache_path(split), log=log.info)
    return {
        "splits": splits,
        "cache_dir": str(datamodule.hparams.cache_dir),
        "latents": bool(cfg.vae),
        "lips": bool(cfg.lips),
    }


def shards(cfg: DictConfig) -> dict:
    """Write the cache of every split of data=<corpus> that has a manifest as LitData shards under out=."""
    from temposyncdiff.data.cache import cache_key, open_cache
    from temposyncdiff.data.datamodule import SPLITS, DataConfigError

    try:
        from temposyncdiff.data.shards import ShardError, write_shards
    except ImportError as err:
        raise DataConfigError(f"tsd-data shards needs litdata ({err}): pip install -e '.[scale]'") from err

    datamodule = hydra.utils.instantiate(cfg.data, shard_dir=cfg.out, _convert_="all")
    hp, written = datamodule.hparams, {}
    for split in SPLITS:
        try:
            rows = datamodule.rows(split)
        except DataConfigError:
            continue  # no or empty manifest: nothing to shard
        reader = open_cache(datamodule.cache_path(split), cache_key(rows, hp.image_size, datamodule.audio, hp.fps))
        meta = write_shards(
            reader,
            datamodule.shard_path(split),
            hp.clip_len,
            hp.stride,
            chunk_bytes=cfg.chunk_bytes,
            workers=cfg.workers,
            force=cfg.force,
            start_method=cfg.start_method,
            log=log.info,
        )
        written[split] = {"path": datamodule.shard_path(split), "clips": meta["num_items"], "digest": meta["digest"]}
    if not written:
        raise ShardError(f"{hp.manifest_dir}: no manifest of data.name={hp.name} to shard (run tsd-data manifest)")
    return {"out": cfg.out, "splits": written}


@task
def run(cfg: DictConfig) -> dict:
    """Run one corpus command and return its summary."""
    return globals()[cfg.command](cfg)


def main() -> None:
    """Turn ``tsd-data <command>`` into the Hydra override ``data_command=<command>``, then run."""
    args = sys.argv[1:]
    if not args or args[0] not in COMMANDS:
        what = f"unknown command {args[0]!r}" if args and "=" not in args[0] else "no command given"
        usage = f"usage: tsd-data {{{'|'.join(COMMANDS)}}} [key=value ...] (see conf/data_command/)"
        print(f"error: {what}; {usage}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    sys.argv = [sys.argv[0], f"data_command={args[0]}", *args[1:]]
    hydra_main("data", run)


if __name__ == "__main__":
    main()
