"""``tsd-bench task=prepare_memory``: peak memory and time of ``tsd-data prepare`` vs video length and size.

Each test video is made here (a real face photo shipped with matplotlib drifting over a textured background,
with a stereo tone-and-noise track) and prepared by the real CLI in a child process, whose peak RSS the
kernel reports when it ends (``os.wait4``), so one run cannot inflate another's number.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import av
import matplotlib
import numpy as np
from PIL import Image

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
_KB = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


def make_test_video(
    path: str | os.PathLike, seconds: float, height: int, fps: int = 25, audio_rate: int = 48000, seed: int = 0
) -> Path:
    """A 16:9 H.264 + AAC stereo video: the photo (0.7 x frame height) drifting over blurred noise.

    The sound is a modulated 220 Hz tone with noise, silent for 0.3 s every 3 s (quiet points to cut at).
    """
    path, width = Path(path), round(height * 16 / 9 / 2) * 2
    rng = np.random.default_rng(seed)
    small = rng.integers(40, 200, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    background = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))
    with Image.open(PHOTO) as im:
        ph = round(0.7 * height)
        photo = np.asarray(im.convert("RGB").resize((round(im.width * ph / im.height), ph), Image.Resampling.BILINEAR))
    room_x, room_y = width - photo.shape[1], height - photo.shape[0]
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        vs.pix_fmt, vs.width, vs.height = "yuv420p", width, height
        aus = out.add_stream("aac", rate=audio_rate, layout="stereo")
        for i in range(round(seconds * fps)):
            t = i / fps
            x = round(room_x * (0.5 + 0.4 * np.sin(2 * np.pi * t / 5)))
            y = round(room_y * (0.5 + 0.4 * np.sin(2 * np.pi * t / 7)))
            frame = background.copy()
            frame[y : y + photo.shape[0], x : x + photo.shape[1]] = photo
            out.mux(vs.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(vs.encode())
        block = 1024
        for start in range(0, round(seconds * audio_rate), block):
            t = (start + np.arange(block)) / audio_rate
            wave = 0.2 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
            wave = (wave + rng.normal(0, 0.02, block)) * ((t % 3.0) >= 0.3)
            chunk = np.stack([wave, 0.8 * wave]).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = audio_rate, start
            out.mux(aus.encode(frame))
        out.mux(aus.encode())
    return path


def run_child(cmd: list[str], log_path: Path) -> dict:
    """Run ``cmd`` with its output in ``log_path``; its exit code, peak RSS (MB), wall and CPU seconds."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "rc": proc.returncode,
        "peak_rss_mb": round(usage.ru_maxrss * _KB / 2**20, 1),
        "wall_s": round(time.perf_counter() - start, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
    }


def bench_prepare(
    seconds: Iterable[float],
    heights: Iterable[int],
    fps: int = 25,
    audio_rate: int = 48000,
    settings: dict[str, Any] | None = None,
    work_dir: str | os.PathLike | None = None,
    log: Callable[[str], Any] = print,
) -> dict:
    """Prepare one made-up video per (height, length) in a child process each; rows of peak RSS and time.

    Also measures the child's fixed cost (imports and the face detector) and, per height, how peak RSS
    grows with length (least-squares slope in MB per minute of video: ~0 when memory is flat).
    """
    overrides = [f"{k}={'null' if v is None else v}" for k, v in (settings or {}).items()]
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="prepare_memory_") as tmp:
        tmp = Path(tmp)
        imports = run_child(
            [sys.executable, "-c", "import temposyncdiff.cli.data, temposyncdiff.data.prepare as p; p.FaceDetector()"],
            tmp / "imports.log",
        )
        log(f"imports and face detector only: {imports['peak_rss_mb']} MB")
        rows = []
        for height in heights:
            for secs in seconds:
                name = f"{height}p_{secs:g}s"
                t = time.perf_counter()
                video = make_test_video(tmp / f"{name}.mp4", secs, height, fps, audio_rate)
                made_s = time.perf_counter() - t
                out = tmp / "out" / name
                cmd = [
                    sys.executable,
                    "-m",
                    "temposyncdiff.cli.data",
                    "prepare",
                    f"inputs={video}",
                    f"out={out}",
                    f"paths.root_dir={tmp}",
                    "extras.print_config=false",
                    *overrides,
                ]
                row = {
                    "height": height,
                    "width": round(height * 16 / 9 / 2) * 2,
                    "seconds": secs,
                    "frames": round(secs * fps),
                    "make_s": round(made_s, 2),
                    **run_child(cmd, tmp / f"{name}.log"),
                }
                row["utterances"] = len(list(out.glob("*/*.mp4")))
                if row["rc"]:
                    lines = (tmp / f"{name}.log").read_text().strip().splitlines()
                    row["error"] = lines[-1] if lines else f"exit {row['rc']}"
                log(f"{name}: {row}")
                rows.append(row)
    growth = {}
    for height in dict.fromkeys(r["height"] for r in rows):
        pts = [(r["seconds"], r["peak_rss_mb"]) for r in rows if r["height"] == height and not r["rc"]]
        if len({s for s, _ in pts}) >= 2:
            growth[height] = round(float(np.polyfit(*zip(*pts), 1)[0]) * 60, 1)
    return {
        "imports_rss_mb": imports["peak_rss_mb"],
        "rows": rows,
        "growth_mb_per_min": growth,
        "config": {"fps": fps, "audio_rate": audio_rate, "settings": settings or {}},
    }


def report_markdown(report: dict, machine: dict) -> str:
    """The rows as a markdown table, with the fixed cost and the growth per minute of video."""
    lines = [
        "# tsd-data prepare: peak memory vs video length and size",
        "",
        f"{machine['cpu']}, {machine['cores']} cores, {machine['date']}, load average "
        f"{' '.join(map(str, machine['load_avg']))}. One child process per video (`tsd-data prepare`); "
        f"peak RSS from the kernel. Imports and face detector alone: {report['imports_rss_mb']:.0f} MB.",
        "",
        "| video | seconds | frames | peak RSS MB | wall s | CPU s | x real time | utterances | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['width']}x{r['height']} | {r['seconds']:g} | {r['frames']} | {r['peak_rss_mb']:.0f} | "
            f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['wall_s'] / r['seconds']:.2f} | {r['utterances']} | "
            f"{r.get('error', '')} |"
        )
    if report["growth_mb_per_min"]:
        lines += [
            "",
            "Peak RSS growth with length (least squares): "
            + ", ".join(f"{h}p {g:+.1f} MB per minute of video" for h, g in report["growth_mb_per_min"].items()),
        ]
    return "\n".join(lines) + "\n"
