"""Speed of tta's batched ImageNet-C corruptions against the original code, one process.

For every corruption: milliseconds per image of ``tta.corruptions.corrupt`` on a batch
(default 64 images, 224 px, severity 5) and of the original ``imagenet_c`` functions
(image by image, as the original runs; fewer images for the slow ones), on the same
CPU. tta is timed on float images (float in, float out) and on uint8 ones (uint8
in and out, as the original's PIL images and ``np.uint8`` results: what decoders
give), both channels-last, each in every round (``--dtypes``). Every repeat is a round of all the corruptions, each tta then the original, so
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
    ap.add_argument("--dtypes", default="float32,uint8",
                    help="tta's image dtypes, each timed in every round: float32 (in [0, 1]) and/or uint8")
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

    dtypes = args.dtypes.split(",")
    if not dtypes or any(d not in ("float32", "uint8") for d in dtypes):
        ap.error(f"--dtypes {args.dtypes}: give float32, uint8 or both (comma-separated)")
    threads = set_threads(args.threads)
    frost_dir = default_frost_dir()
    orig = ref.load_reference(frost_dir)
    x32, _ = load_image_folder(cifar10_dir("test"), num_images=args.batch_size, seed=0)
    x = F.interpolate(x32, size=args.size, mode="bilinear", align_corners=False)
    x = x.mul(255).round().clamp(0, 255).div(255).to(args.device)
    clean_u8 = (x.cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    # both in the float batch's layout: channels-last (HWC memory, as decoders give
    # pixels and tta.data's loaders and tta-bench's .npy pools hand them on)
    inputs = {"float32": x, "uint8": torch.from_numpy(clean_u8).permute(0, 3, 1, 2).to(args.device)}
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
        for d in dtypes:
            corrupt(inputs[d][:2], name, args.severity, generator=gens[name])
        np.random.seed(0)
        fns[name](pil_images[0], args.severity)
    # per tta dtype, (tta, original) s/image per corruption and clock, one entry per
    # round (the original's time of the round in each)
    times = {d: {name: {"wall": [], "cpu": []} for name in names} for d in dtypes}
    # Rounds of all the corruptions, each tta then the original: a round's total
    # compares both sides over the same seconds, so the machine's drift from minute
    # to minute (the original's glass blur, three quarters of its total, took 0.6 to
    # 1.0 s an image from run to run) does not enter the total's ratio.
    for _ in range(args.repeats):
        for name in names:
            fn, n_ref = fns[name], n_refs[name]
            ours = {}
            for d in dtypes:
                w0, c0 = _clocks(args.device)
                corrupt(inputs[d], name, args.severity, generator=gens[name])
                w1, c1 = _clocks(args.device)
                ours[d] = ((w1 - w0) / len(x), (c1 - c0) / len(x))
            w1, c1 = _clocks(args.device)
            for img in pil_images[:n_ref]:  # the original corrupts one PIL image at a time
                np.uint8(fn(img, args.severity))
            w2, c2 = _clocks(args.device)
            for d, (wall_s, cpu_s) in ours.items():
                times[d][name]["wall"].append((wall_s, (w2 - w1) / n_ref))
                times[d][name]["cpu"].append((cpu_s, (c2 - c1) / n_ref))
    rows = {d: [] for d in dtypes}
    for d in dtypes:
        for name in names:
            row = {"name": name, "original_images": n_refs[name]}
            for clock, pairs in times[d][name].items():
                row[clock] = {
                    "tta_ms_per_image": 1000 * statistics.median(t for t, _ in pairs),
                    "original_ms_per_image": 1000 * statistics.median(r for _, r in pairs),
                    "speedup": statistics.median(r / t for t, r in pairs),
                }
            row.update(row[clock_name])
            rows[d].append(row)
            print(
                f"{d:7s} {name:18s} tta {row['tta_ms_per_image']:8.2f} ms/img   original "
                f"{row['original_ms_per_image']:8.2f} ms/img   x{row['speedup']:.2f}   (wall clock x{row['wall']['speedup']:.2f})",
                flush=True,
            )
    total = {d: totals(times[d], clock_name) for d in dtypes}
    wall = {d: totals(times[d], "wall") for d in dtypes}
    for d in dtypes:
        print(
            f"{d:7s} {'total':18s} tta {total[d]['tta_ms_per_image']:8.2f} ms/img   original "
            f"{total[d]['original_ms_per_image']:8.2f} ms/img   x{total[d]['speedup']:.1f}   (wall clock "
            f"x{wall[d]['speedup']:.1f}; per round, the {len(names)} corruptions summed; rounds "
            f"x{min(total[d]['round_speedups']):.1f}-{max(total[d]['round_speedups']):.1f})"
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
        "dtypes": dtypes,
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


def render_markdown(meta: dict, rows: dict[str, list[dict]], total: dict[str, dict], wall: dict[str, dict]) -> str:
    """One table: per corruption, tta's time for each image dtype, the original's
    (from the first dtype's pairs: the same rounds) and each speed-up."""
    dtypes = list(rows)
    first = dtypes[0]
    spread = "; ".join(f"{d} {min(total[d]['round_speedups']):.1f}-{max(total[d]['round_speedups']):.1f}x"
                       for d in dtypes)
    lines = [
        "# ImageNet-C corruptions: tta (batched torch) vs the original code",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['cpu']}, {meta['cores']} cores, {meta['threads']} thread{'s' * (meta['threads'] != 1)} "
        "each: tta (torch) and the "
        "original (OpenBLAS, OpenCV and ImageMagick set to match); "
        f"device `{meta['device']}`, torch {meta['torch']}",
        f"- workload: severity {meta['severity']}, {meta['size']}x{meta['size']} px (CIFAR-10 test images upsampled), "
        f"tta on one batch of {meta['batch_size']} ("
        + ", ".join({"float32": "float32 in [0, 1] in and out", "uint8": "uint8 in and out"}[d] for d in dtypes)
        + "; both channels-last"
        + "), the original image by image (`imagenet_c` functions, "
        "PIL in, `np.uint8` out) on the first few images of the same batch",
        f"- {meta['repeats']} rounds of every corruption, each tta ({', '.join(dtypes)}) then the original; times are "
        + ("process CPU time (the time other jobs take is left out)" if meta["clock"] == "cpu" else "wall clock")
        + "; medians over the rounds; speed-up = median of the per-round ratios; total = the per-image times "
        f"summed over the corruptions within each round, their ratio's median over the rounds (rounds {spread})",
        f"- command: `TTA_HOME=../shared {meta['command']}`",
        f"- 1-min load average at start / end: {meta['loadavg_1min'][0]} / {meta['loadavg_1min'][1]} "
        "(other jobs running beside; interleaving spreads their load over both sides)",
        "",
        "| corruption | " + " | ".join(f"tta {d} (ms/image)" for d in dtypes)
        + " | original (ms/image) | original images/round | " + " | ".join(f"speed-up {d}" for d in dtypes) + " |",
        "|---|" + "---:|" * (2 * len(dtypes) + 2),
    ]
    for i, r in enumerate(rows[first]):
        lines.append(
            f"| {r['name']} | " + " | ".join(f"{rows[d][i]['tta_ms_per_image']:.2f}" for d in dtypes)
            + f" | {r['original_ms_per_image']:.2f} | {r['original_images']} | "
            + " | ".join(f"{rows[d][i]['speedup']:.2f}x" for d in dtypes) + " |"
        )
    lines.append(
        f"| **total ({len(rows[first])})** | " + " | ".join(f"**{total[d]['tta_ms_per_image']:.1f}**" for d in dtypes)
        + f" | **{total[first]['original_ms_per_image']:.0f}** | | "
        + " | ".join(f"**{total[d]['speedup']:.1f}x**" for d in dtypes) + " |"
    )
    if meta["clock"] == "cpu":
        lines += [
            "",
            "Wall clock in the same run, per image summed over the "
            f"{len(rows[first])}: original {wall[first]['original_ms_per_image']:.0f} ms; "
            + "; ".join(f"tta {d} {wall[d]['tta_ms_per_image']:.1f} ms, {wall[d]['speedup']:.1f}x" for d in dtypes)
            + " (the machine's other jobs took their share of both).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
