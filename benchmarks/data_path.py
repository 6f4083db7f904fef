"""Is loading the bottleneck of a tta-bench run? The run's stream timed alone, then
the run itself, in one process.

For a tta-bench config (command-line style overrides):

- **stream**: the run's loader alone (decoding, pinned-memory transfer: the
  DataLoader workers, or the tensor cache decoded before the loop) and with
  rendering (on-the-fly corruption and resize: the model input), synchronised
  per batch as the loop is; images/s after the first batch (it pays the workers'
  start), the first batch's seconds, and the cache's decoding apart;
- **run**: ``run_benchmark`` on the same config: images/s of the method calls and
  end to end (results.json), the loop's seconds, peak memory;
- **overlap**: how long the run's loop waited for its batches (each ``next()`` on
  the loader timed inside the run), against the loader's seconds alone: the
  seconds of loading the loop hid behind adaptation, ``load_s - wait_s``, and
  their share of ``load_s`` (0: loading and adaptation took turns; 1: loading
  cost the loop nothing).

    TTA_HOME=../shared python -m benchmarks.data_path --model resnet50 --method tent \\
        --corruptions gaussian_noise fog --num-images 256 --workers 0 2 --threads 2

builds an ImageNet-C tree and an ImageFolder of upsampled shared images in a
temporary folder (:mod:`benchmarks.upsampled_images`), times the DataLoader path
(``data=imagenetc``, ``data.cache_mb=0``) with each ``--workers`` and the on-the-fly
path (``data=imagefolder_c``, tensor cache), and prints the table.
:func:`jpeg_decode_rates` compares Pillow's decoding (what the workers run) with
torchvision's ``decode_jpeg`` on the run device (nvJPEG on a GPU).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from tta.bench import compose_config, read_config, run_benchmark
from tta.bench.files import decode_image
from tta.bench.render import BatchRenderer
from tta.bench.runner import setup
from tta.bench.stream import BatchLoader, open_stream

from benchmarks.common import cpu_model, sync
from benchmarks.upsampled_images import write_image_folder, write_imagenet_c_tree

#: Settings of every measured run that do not change what is measured.
QUIET = ["run.plot=false", "run.progress=false", "run.skip_existing=false", "run.checkpoint_minutes=0"]


def _pass(loader, render, device: torch.device) -> dict:
    """One pass over the loader (each batch rendered when ``render``), per batch
    synchronised: total and first batch seconds, images/s after the first."""
    t0 = time.perf_counter()
    first, images, rest = None, 0, 0
    for batch in loader:
        x = render(batch) if render is not None else batch.images
        del x
        sync(device)
        if first is None:
            first = time.perf_counter() - t0
        else:
            rest += len(batch.labels)
        images += len(batch.labels)
    total = time.perf_counter() - t0
    after = total - (first or 0.0)
    return dict(total_s=total, first_s=first, images=images,
                images_per_s=rest / after if rest and after > 0 else images / total)


def time_stream(overrides: Sequence[str]) -> dict:
    """The stream of the tta-bench config ``overrides`` timed alone (see the module
    doc): the loader, then the loader with rendering."""
    cfg = read_config(compose_config([*overrides, *QUIET]))
    job = setup(cfg)  # the model fixes the stream's input size and label check
    stream, loader = open_stream(cfg.data, cfg.scenario, cfg.run, job.device, input_size=job.input_size,
                                 model_classes=getattr(job.model, "num_classes", None), model_name=cfg.model.name)
    render = BatchRenderer(stream, seed=cfg.run.seed, preset=cfg.data.preset, input_size=job.input_size)
    t0 = time.perf_counter()
    loader.prepare()
    prepare_s = time.perf_counter() - t0
    return dict(loader="tensor_cache" if loader.cached else "dataloader", num_workers=cfg.data.num_workers,
                pin_memory=job.device.type == "cuda" and not loader.cached, prepare_s=prepare_s,
                load=_pass(loader, None, job.device), load_render=_pass(loader, render, job.device))


@contextmanager
def timed_waits(waits: list[float]) -> Iterator[None]:
    """Within the block, every batch a :class:`BatchLoader` yields appends to
    ``waits`` the seconds its consumer waited for it (decoding, or the DataLoader
    workers falling behind, and the copy to the device)."""
    original = BatchLoader.iter_from

    def iter_from(self, start: int):
        batches = original(self, start)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return
            waits.append(time.perf_counter() - t0)
            yield batch

    BatchLoader.iter_from = iter_from
    try:
        yield
    finally:
        BatchLoader.iter_from = original


def run(overrides: Sequence[str], out_dir: str | Path) -> dict:
    """``run_benchmark`` on the config ``overrides``; what the comparison needs of
    its results, and ``wait_s``: the seconds its loop waited for batches."""
    waits: list[float] = []
    with timed_waits(waits):
        res = run_benchmark(compose_config([*overrides, *QUIET]), out_dir)
    keep = ("images_per_s", "images_per_s_end_to_end", "seconds", "peak_mem_mb", "peak_mem_kind", "loader",
            "num_images", "mean_error", "device")
    return {**{k: res.get(k) for k in keep}, "wait_s": sum(waits)}


def measure(overrides: Sequence[str], out_dir: str | Path) -> dict:
    """The stream alone, the run, and how much loading the run hid (module doc)."""
    stream = time_stream(overrides)
    result = run(overrides, out_dir)
    load_s, wait_s = stream["load"]["total_s"], result["wait_s"]
    return dict(overrides=list(overrides), stream=stream, run=result,
                overlap=dict(load_s=load_s, wait_s=wait_s, loop_s=result["seconds"]["loop"],
                             adapt_s=result["seconds"]["adapt"], hidden_s=load_s - wait_s,
                             share=(load_s - wait_s) / load_s if load_s > 0 else math.nan))


def jpeg_decode_rates(files: Sequence[Path], device: str, batch_size: int = 64) -> dict:
    """Images/s of decoding ``files``: Pillow in this process, one file at a time
    (what each DataLoader worker runs), and torchvision's ``decode_jpeg`` on
    ``device`` in batches (nvJPEG on a GPU), bytes read from disk included in both."""
    from torchvision.io import decode_jpeg, read_file

    dev = torch.device(device)
    t0 = time.perf_counter()
    for f in files:
        decode_image(f)
    pil = len(files) / (time.perf_counter() - t0)
    decode_jpeg([read_file(str(f)) for f in files[:2]], device=dev)  # warm-up (nvJPEG handles)
    sync(dev)
    t0 = time.perf_counter()
    for s in range(0, len(files), batch_size):
        decode_jpeg([read_file(str(f)) for f in files[s:s + batch_size]], device=dev)
    sync(dev)
    return dict(images=len(files), pil_images_per_s=pil,
                torchvision_images_per_s=len(files) / (time.perf_counter() - t0), device=str(dev))


def _num(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(rows: Sequence[dict]) -> list[str]:
    """Table lines of :func:`measure` results, one row each."""
    lines = ["| data | loader | workers | stream img/s (load / + render) | first batch s | method img/s | "
             "stream >= method | end-to-end img/s | loop waited for data / loading alone | peak MB |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        s, res, o = r["stream"], r["run"], r["overlap"]
        loader = s["loader"] + (", pinned" if s["pin_memory"] else "")
        fast_enough = "✓" if s["load_render"]["images_per_s"] >= (res["images_per_s"] or 0) else "✗"
        lines.append(
            f"| {r['label']} | {loader} | {s['num_workers']} | "
            f"{s['load']['images_per_s']:.0f} / {s['load_render']['images_per_s']:.0f} | "
            f"{_num(s['load_render']['first_s'], 2)} | {_num(res['images_per_s'], 1)} | {fast_enough} | "
            f"{_num(res['images_per_s_end_to_end'], 1)} | {o['wait_s']:.2f} s / {o['load_s']:.2f} s "
            f"({100 * o['share']:.0f}% hidden) | {_num(res['peak_mem_mb'])} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50", help="conf/model/ name")
    ap.add_argument("--method", default="tent")
    ap.add_argument("--corruptions", nargs="+", default=["gaussian_noise", "fog"])
    ap.add_argument("--num-images", type=int, default=256, help="images per corruption")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers to compare")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=None, help="folder for the images and runs (default: a temporary one)")
    ap.add_argument("--no-on-the-fly", action="store_true", help="time the DataLoader path only")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        per_class = -(-args.num_images // 10)
        tree, folder = work / "ImageNet-C", work / "images"
        if not tree.exists():
            write_imagenet_c_tree(tree, args.corruptions, per_class, device=args.device)
        if not folder.exists():
            write_image_folder(folder, per_class)
        common = [f"model={args.model}", "model.pretrained=false", f"method={args.method}",
                  f"run.device={args.device}", f"run.batch_size={args.batch_size}", f"run.num_threads={args.threads}",
                  f"data.corruptions=[{','.join(args.corruptions)}]", f"data.num_images={args.num_images}"]
        rows = []
        for w in args.workers:
            ov = [*common, "data=imagenetc", f"data.root={tree}", "data.cache_mb=0", f"data.num_workers={w}"]
            rows.append(dict(label=f"imagenetc, {w} worker{'s' if w != 1 else ''}",
                             **measure(ov, work / f"run_imagenetc_w{w}")))
            print("\n".join(markdown(rows[-1:])), flush=True)
        if not args.no_on_the_fly:
            ov = [*common, "data=imagefolder_c", f"data.root={folder}", f"data.num_workers={args.workers[-1]}"]
            rows.append(dict(label="imagefolder_c (on the fly)", **measure(ov, work / "run_imagefolder_c")))
    print("\n".join(markdown(rows)))
    print(f"\n{args.model} (random weights), {args.method}, batch {args.batch_size}, {args.device}, "
          f"{args.threads} torch threads, {len(args.corruptions)} corruptions x {args.num_images} images, "
          f"torch {torch.__version__}, {cpu_model()}")


if __name__ == "__main__":
    main()
