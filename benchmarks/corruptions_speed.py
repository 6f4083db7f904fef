"""Speed of tta's batched ImageNet-C corruptions against the original code, one process.

For every corruption: milliseconds per image of ``tta.corruptions.corrupt`` on a batch
(default 64 images, 224 px, severity 5) and of the original ``imagenet_c`` functions
(image by image, as the original runs; fewer images for the slow ones), on the same
CPU. Every repeat is a round of all the corruptions, each tta then the original, so
load from other jobs hits both sides alike: per corruption the median of the
per-round speed ratios is reported; the total is, per round, the ratio of the
per-image times summed over the corruptions, its median over the rounds.

    TTA_HOME=../shared python -m benchmarks.corruptions_speed --threads 1 --repeats 3 \
        --markdown /tmp/corruptions_speed.md

``--threads`` (default 1) holds for both sides: torch, and the original's native
libraries (OpenBLAS under NumPy, OpenCV, ImageMagick's OpenMP), whose thread
settings are made before they load. ``--markdown`` writes the table with its date,
machine and command, as it stands in RESULTS.md. Needs the test extras of the
fidelity tests (imagenet-c, wand + ImageMagick, OpenCV, scikit-image, SciPy); see
``benchmarks/corruption_reference.py``.
"""

from __future__ import annotations

import os
import sys


def _threads_from_argv(argv: list[str], default: int = 1) -> int:
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return default


# The original's native libraries read their thread counts once, when they load
# (imports below): OpenBLAS (NumPy), OpenMP (ImageMagick, which runs its motion blur).
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MAGICK_THREAD_LIMIT")
if __name__ == "__main__":
    for _var in _THREAD_VARS:
        os.environ[_var] = str(_threads_from_argv(sys.argv[1:]))

import argparse  # noqa: E402
import datetime  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tta.corruptions import NAMES, corrupt  # noqa: E402
from tta.corruptions._frost import default_frost_dir  # noqa: E402
from tta.data import cifar10_dir, load_image_folder  # noqa: E402

from benchmarks import corruption_reference as ref  # noqa: E402
from benchmarks.common import cpu_model, sync, write_json  # noqa: E402

# images the original processes per round (its pure-Python glass blur takes ~1 s each)
REF_IMAGES = {"glass_blur": 1, "default": 8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", default=",".join(NAMES))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=224,
                    help="image side; the original imagenet_c functions run at 224 only (fog's plasma, frost's crops)")
    ap.add_argument("--severity", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="for torch and the original's libraries alike")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu",
        help="what the table reports: process CPU time (robust to other jobs) or wall-clock time; both are recorded",
    )
    ap.add_argument("--json", default=None, help="write raw results here")
    ap.add_argument("--markdown", default=None, help="write the results table here")
    ap.add_argument("--append", action="store_true", help="append to --markdown instead of overwriting it")
    args = ap.parse_args()
    if args.size != 224:
        ap.error(f"--size {args.size}: the original imagenet_c functions it is timed against assume 224 px "
                 "images (fog's 256-px plasma, frost's crops); time tta.corruptions alone for other sizes")

    threads = set_threads(args.threads)
    frost_dir = default_frost_dir()
    orig = ref.load_reference(frost_dir)
    x32, _ = load_image_folder(cifar10_dir("test"), num_images=args.batch_size, seed=0)
    x = F.interpolate(x32, size=args.size, mode="bilinear", align_corners=False)
    x = x.mul(255).round().clamp(0, 255).div(255).to(args.device)
    clean_u8 = (x.cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    from PIL import Image

    pil_images = [Image.fromarray(a) for a in clean_u8]

    # CPU time of the process (every thread; each side runs one) leaves out the time
    # other jobs on a shared machine take: the figure a quiet machine's wall clock
    # gives. Accelerators are timed by the wall clock.
    clock_name = args.clock if args.device == "cpu" else "wall"
    load_before = os.getloadavg()[0]
    names = args.names.split(",")
    fns, gens, n_refs = {}, {}, {}
    for name in names:  # warm caches (kernels, textures) before any timing
        n_refs[name] = min(REF_IMAGES.get(name, REF_IMAGES["default"]), len(pil_images))
        fns[name] = getattr(orig, name)
        gens[name] = torch.Generator(device=args.device).manual_seed(0)
        corrupt(x[:2], name, args.severity, generator=gens[name])
        np.random.seed(0)
        fns[name](pil_images[0], args.severity)
    # (tta, original) s/image per corruption and clock, one entry per round
    times = {name: {"wall": [], "cpu": []} for name in names}
    # Rounds of all the corruptions, each tta then the original: a round's total
    # compares both sides over the same seconds, so the machine's drift from minute
    # to minute (the original's glass blur, three quarters of its total, took 0.6 to
    # 1.0 s an image from run to run) does not enter the total's ratio.
    for _ in range(args.repeats):
        for name in names:
            fn, n_ref = fns[name], n_refs[name]
            w0, c0 = _clocks(args.device)
            corrupt(x, name, args.severity, generator=gens[name])
            w1, c1 = _clocks(args.device)
            for img in pil_images[:n_ref]:  # the original corrupts one PIL image at a time
                np.uint8(fn(img, args.severity))
            w2, c2 = _clocks(args.device)
            times[name]["wall"].append(((w1 - w0) / len(x), (w2 - w1) / n_ref))
            times[name]["cpu"].append(((c1 - c0) / len(x), (c2 - c1) / n_ref))
    rows = []
    for name in names:
        row = {"name": name, "original_images": n_refs[name]}
        for clock, pairs in times[name].items():
            row[clock] = {
                "tta_ms_per_image": 1000 * statistics.median(t for t, _ in pairs),
                "original_ms_per_image": 1000 * statistics.median(r for _, r in pairs),
                "speedup": statistics.median(r / t for t, r in pairs),
            }
        row.update(row[clock_name])
        rows.append(row)
        print(
            f"{name:18s} tta {row['tta_ms_per_image']:8.2f} ms/img   original {row['original_ms_per_image']:8.2f} ms/img"
            f"   x{row['speedup']:.2f}   (wall clock x{row['wall']['speedup']:.2f})",
            flush=True,
        )
    total = totals(times, clock_name)
    wall = totals(times, "wall")
    print(
        f"{'total':18s} tta {total['tta_ms_per_image']:8.2f} ms/img   original {total['original_ms_per_image']:8.2f} ms/img"
        f"   x{total['speedup']:.1f}   (wall clock x{wall['speedup']:.1f}; per round, the {len(rows)} corruptions summed;"
        f" rounds x{min(total['round_speedups']):.1f}-{max(total['round_speedups']):.1f})"
    )

    meta = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "clock": clock_name,
        "threads": args.threads,
        "thread_settings": threads,
        "device": args.device,
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "size": args.size,
        "severity": args.severity,
        "repeats": args.repeats,
        "command": "python -m benchmarks.corruptions_speed " + " ".join(sys.argv[1:]),
        # the machine may be shared: a load above the thread count slows both sides
        "loadavg_1min": (round(load_before, 2), round(os.getloadavg()[0], 2)),
        "cores": os.cpu_count(),
    }
    if args.json:
        write_json(args.json, {"meta": meta, "rows": rows, "total": total, "total_wall": wall})
    if args.markdown:
        text = render_markdown(meta, rows, total, wall)
        path = Path(args.markdown)
        if args.append and path.exists():
            text = path.read_text() + "\n" + text.replace("# ImageNet-C corruptions", "## Rerun: ImageNet-C corruptions", 1)
        path.write_text(text)
        print(f"results written to {args.markdown}")


def _clocks(device: str) -> tuple[float, float]:
    sync(device)
    return time.perf_counter(), time.process_time()


def set_threads(n: int) -> dict:
    """``n`` threads for torch and for the original's libraries that can be told at
    run time (OpenCV, ImageMagick); OpenBLAS and OpenMP were set from the
    environment before they loaded. Returns what each library reports."""
    torch.set_num_threads(n)
    out = {"torch": torch.get_num_threads()}
    out.update({var: os.environ.get(var) for var in _THREAD_VARS})
    try:
        import cv2

        cv2.setNumThreads(n)
        out["opencv"] = cv2.getNumThreads()
    except ImportError:
        pass
    try:
        from wand.resource import limits

        limits["thread"] = n
        out["imagemagick"] = int(limits["thread"])
    except ImportError:
        pass
    return out


def totals(times: dict[str, dict[str, list[tuple[float, float]]]], clock: str) -> dict:
    """Per round, the per-image times summed over the corruptions and their ratio;
    medians over the rounds (ms), and every round's ratio."""
    rounds = list(zip(*(times[name][clock] for name in times)))  # per round: (tta, original) per corruption
    ours = [sum(t for t, _ in r) for r in rounds]
    orig = [sum(o for _, o in r) for r in rounds]
    speedups = [o / t for t, o in zip(ours, orig)]
    return {"tta_ms_per_image": 1000 * statistics.median(ours), "original_ms_per_image": 1000 * statistics.median(orig),
            "speedup": statistics.median(speedups), "round_speedups": speedups}


def render_markdown(meta: dict, rows: list[dict], total: dict, wall: dict) -> str:
    lines = [
        "# ImageNet-C corruptions: tta (batched torch) vs the original code",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['cpu']}, {meta['cores']} cores, {meta['threads']} thread{'s' * (meta['threads'] != 1)} "
        "each: tta (torch) and the "
        "original (OpenBLAS, OpenCV and ImageMagick set to match); "
        f"device `{meta['device']}`, torch {meta['torch']}",
        f"- workload: severity {meta['severity']}, {meta['size']}x{meta['size']} px (CIFAR-10 test images upsampled), "
        f"tta on one batch of {meta['batch_size']}, the original image by image (`imagenet_c` functions, "
        f"PIL in, `np.uint8` out) on the first few images of the same batch",
        f"- {meta['repeats']} rounds of every corruption, each tta then the original; times are "
        + ("process CPU time (the time other jobs take is left out)" if meta["clock"] == "cpu" else "wall clock")
        + "; medians over the rounds; speed-up = median of the per-round ratios; total = the per-image times "
        "summed over the corruptions within each round, their ratio's median over the rounds "
        f"(rounds {min(total['round_speedups']):.1f}-{max(total['round_speedups']):.1f}x)",
        f"- command: `TTA_HOME=../shared {meta['command']}`",
        f"- 1-min load average at start / end: {meta['loadavg_1min'][0]} / {meta['loadavg_1min'][1]} "
        "(other jobs running beside; interleaving spreads their load over both sides)",
        "",
        "| corruption | tta (ms/image) | original (ms/image) | original images/round | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['tta_ms_per_image']:.2f} | {r['original_ms_per_image']:.2f} | "
            f"{r['original_images']} | {r['speedup']:.2f}x |"
        )
    lines.append(
        f"| **total ({len(rows)})** | **{total['tta_ms_per_image']:.1f}** | **{total['original_ms_per_image']:.0f}** | "
        f"| **{total['speedup']:.1f}x** |"
    )
    if meta["clock"] == "cpu":
        lines += [
            "",
            f"Wall clock in the same run: tta {wall['tta_ms_per_image']:.1f} ms, original "
            f"{wall['original_ms_per_image']:.0f} ms per image summed over the {len(rows)}: {wall['speedup']:.1f}x "
            "(the machine's other jobs took their share of both).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
