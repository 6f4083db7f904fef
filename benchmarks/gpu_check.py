"""One prepared device check (issue 27): everything a CUDA GPU should show about tta,
in one command of at most 8 minutes, written to one JSON and one Markdown file.

    TTA_HOME=<shared folder> python -m benchmarks.gpu_check --out $OUT            # on a GPU
    TTA_HOME=../shared python -m benchmarks.gpu_check --out /tmp/gc --device cpu --quick

``--quick`` runs every section at tiny sizes (ResNet-20 at batch 4, 2 corruptions
at 64 px, a 2-domain x 8-image stream) in well under a minute on the CPU; the
test suite runs it (tests/test_gpu_check.py), so the script is known to work
before a GPU sees it. Sections, in order, each in a process of its own:

1. ``cuda_tests``: the tests marked ``cuda`` (``pytest -m cuda``): counts, failures.
2. ``corruptions``: :func:`tta.corruptions.corrupt` at 224 px, batch 64, severity 5,
   all 15 + 4: ms per image on the device for float images with one generator, for
   uint8 images with one generator, and for uint8 images with one generator per
   image (as tta-bench renders), the 15 summed against the original code's 1087 ms
   per image on one CPU thread (target: >= 1000x).
3. ``speed``: :func:`benchmarks.speed.measure`: every method as a multiple of plain
   inference, images/s and peak memory, on ``timm:resnet50`` and
   ``timm:vit_base_patch16_224`` (random weights, batch 64, 224 px) and the CIFAR
   zoo models (batch 200), in float32 and bf16 + channels-last. Targets for
   ResNet-50 in bf16: norm <= 1.2x, tent <= 2.6x, deyo <= 3.8x, sar <= 4.8x.
4. ``data_path``: :func:`benchmarks.data_path.measure`: a tta-bench run on the
   device of an ImageNet-sized stream (an ImageNet-C tree in the published layout
   of upsampled shared images, :mod:`benchmarks.upsampled_images`) through the
   DataLoader path (workers, pinned memory) and the on-the-fly path; the stream's
   images/s alone against the method's (target: the stream is not slower), and
   Pillow's decoding against torchvision's ``decode_jpeg`` on the device.
5. ``compile``: as ``speed`` with ``compile=True`` for the entropy methods
   (last: compilation is the slowest part and the most likely to run out of time).

Budgets: each section has a time budget; a section whose budget is spent starts no
new measurement and reports what it has (``partial``); one that overruns it by
the grace is killed and recorded as ``timed out`` with what it had written; a
section that fails is recorded with its error; the next one starts either way.
The JSON and Markdown are rewritten after every section, so a run cut short still
leaves them. The images and runs go to a temporary folder (``--work``), never to
``--out`` (which a device run copies back) nor to the shared data folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from benchmarks.common import sync
from benchmarks.gpu_check_report import render_markdown, write_atomic

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("cuda_tests", "corruptions", "speed", "data_path", "compile")
#: The original ImageNet-C code's seconds per image for the 15 corruptions, summed,
#: on one thread of this project's CPU (issue 27), in ms.
ORIGINAL_MS_PER_IMAGE_15 = 1087.0
BF16 = dict(amp="bf16", channels_last=True)
ENTROPY = ("norm", "tent", "eta", "sar", "deyo")
#: Methods that run many forwards per step (augmented views, teachers): last in a
#: table, so that a budget spent early drops them rather than the cheap ones.
HEAVY = ("rmt", "adacontrast", "cotta", "ttaug")


@dataclass(frozen=True)
class Group:
    """One speed table: ``methods`` on ``model`` at ``batch``, with ``options``
    (named ``setting``); ``weight``: its share of the section's budget."""

    model: str
    batch: int
    setting: str
    options: dict
    methods: tuple[str, ...]
    weight: float = 1.0


@dataclass(frozen=True)
class DataPlan:
    """The data-path section's stream: ``corruptions`` x ``num_images`` images of
    ``size`` px through tent on the conf/model ``model`` (``overrides`` added),
    by DataLoader with each of ``workers``, then on the fly."""

    model: str
    overrides: tuple[str, ...]
    corruptions: tuple[str, ...]
    per_class: int
    num_images: int
    size: int
    batch: int
    workers: tuple[int, ...]
    wnids: bool
    decode_files: int


@dataclass(frozen=True)
class Plan:
    """What each section runs, its time budget (s), the run's total and the grace
    a section gets past its budget before it is killed."""

    budgets: dict
    total_s: float
    grace_s: float
    corruptions: tuple[str, ...]
    corruption_size: int
    corruption_batch: int
    repeats: int
    speed: tuple[Group, ...]
    compile: tuple[Group, ...]
    data: DataPlan
    threads: int | None = None


def _full_plan() -> Plan:
    from tta.corruptions import ALL_NAMES

    from benchmarks.speed import METHODS

    methods = tuple(m for m in METHODS if m not in HEAVY) + tuple(m for m in HEAVY if m in METHODS)
    # Budget weights: ResNet-50 in bf16 holds the targets; the CIFAR models are quick.
    big = [Group("timm:resnet50", 64, "bf16", BF16, methods, 1.5), Group("timm:resnet50", 64, "fp32", {}, methods),
           Group("timm:vit_base_patch16_224", 64, "bf16", BF16, methods),
           Group("timm:vit_base_patch16_224", 64, "fp32", {}, methods, 0.7)]
    cifar = [Group(m, 200, s, o, methods, 0.3) for m in ("cifar10_resnet20", "zoo:resnet20_bn_jpeg",
                                                         "zoo:resnet26_gn", "zoo:vit_tiny_ln")
             for s, o in (("fp32", {}), ("bf16", BF16))]
    compiled = (Group("timm:resnet50", 64, "bf16+compile", {**BF16, "compile": True}, ENTROPY, 2.0),
                Group("timm:vit_base_patch16_224", 64, "bf16+compile", {**BF16, "compile": True}, ENTROPY))
    data = DataPlan("resnet50", ("model.pretrained=false", "method.amp=bf16", "method.channels_last=true"),
                    ("gaussian_noise", "glass_blur"), per_class=160, num_images=1600, size=224, batch=64,
                    workers=(4, 8), wnids=True, decode_files=512)
    return Plan(budgets=dict(cuda_tests=60, corruptions=40, speed=160, data_path=80, compile=90), total_s=450,
                grace_s=15, corruptions=ALL_NAMES, corruption_size=224, corruption_batch=64, repeats=5,
                speed=tuple(big + cifar), compile=compiled, data=data)


def _quick_plan() -> Plan:
    two = ("norm", "tent")
    data = DataPlan("cifar10_resnet20", (), ("gaussian_noise", "glass_blur"), per_class=1, num_images=8, size=32,
                    batch=4, workers=(1,), wnids=False, decode_files=16)
    return Plan(budgets=dict(cuda_tests=30, corruptions=20, speed=30, data_path=40, compile=30), total_s=150,
                grace_s=15, corruptions=("gaussian_noise", "glass_blur"), corruption_size=64, corruption_batch=4,
                repeats=2,
                speed=(Group("cifar10_resnet20", 4, "fp32", {}, two), Group("cifar10_resnet20", 4, "bf16", BF16, two)),
                # the eager backend: dynamo traces, nothing is compiled (inductor takes a minute on a CPU)
                compile=(Group("cifar10_resnet20", 4, "compile (eager backend)", {"compile": "eager"}, ("tent",)),),
                data=data, threads=1)


# ----------------------------------------------------------------------------------
# A section, inside its own process
# ----------------------------------------------------------------------------------


@dataclass
class Context:
    """What a section gets: the device, its deadline (a ``perf_counter`` value),
    the work folder, and the fragment file it saves its results to as it goes."""

    device: str
    deadline: float
    work: Path
    fragment: Path
    result: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        write_atomic(self.fragment, json.dumps(self.result, indent=1, default=str))

    def cut_short(self, what: str) -> None:
        """Record that the budget ran out before ``what``."""
        self.result.setdefault("not_run", []).append(what)


def section_cuda_tests(plan: Plan, ctx: Context) -> None:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "mark.cuda" in p.read_text())
    # one process (-n 0): the suite's two xdist workers would each start CUDA for a handful of tests
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-n", "0", "-p", "no:cacheprovider", "-rfE", *files]
    ctx.result.update(files=files, command="python " + " ".join(cmd[1:]))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5.0, ctx.left()))
        output, ctx.result["returncode"] = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        ctx.cut_short("the rest of the tests (pytest killed at the budget)")
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)",
                                                 summary[-1] if summary else "")}
    ctx.result.update(counts=counts, failed=[line for line in output.splitlines()
                                              if line.startswith(("FAILED", "ERROR"))],
                      tail=output[-3000:])


def section_corruptions(plan: Plan, ctx: Context) -> None:
    import statistics

    import torch.nn.functional as F

    from tta.corruptions import NAMES, corrupt
    from tta.data import cifar10_dir, load_image_folder

    x32, _ = load_image_folder(cifar10_dir("test"), num_images=plan.corruption_batch, seed=0)
    x = F.interpolate(x32, size=plan.corruption_size, mode="bilinear", align_corners=False)
    x = x.mul(255).round().clamp(0, 255).div(255).to(ctx.device)  # 8-bit levels, as decoded files
    u8 = x.mul(255).round().to(torch.uint8)  # the same images as bytes, as tta-bench corrupts them
    n = len(x)

    def ms_per_image(generator: Callable[[], object], name: str, images: torch.Tensor = x) -> float:
        times = []
        for _ in range(plan.repeats):
            sync(ctx.device)
            t0 = time.perf_counter()
            corrupt(images, name, 5, generator=generator())
            sync(ctx.device)
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times) / n

    rows = ctx.result.setdefault("rows", [])
    ctx.result.update(size=plan.corruption_size, batch=n, severity=5, repeats=plan.repeats)
    for name in plan.corruptions:
        if ctx.left() <= 0:
            ctx.cut_short(name)
            continue
        corrupt(x[:2], name, 5, generator=torch.Generator(ctx.device).manual_seed(0))  # kernels, textures
        one = torch.Generator(ctx.device).manual_seed(0)
        rows.append(dict(name=name, ms_per_image=ms_per_image(lambda: one, name),
                         ms_per_image_uint8=ms_per_image(lambda: one, name, u8),
                         # tta-bench seeds each image's own generator, makes them per batch,
                         # and corrupts its uint8 batches
                         ms_per_image_per_image_generators=ms_per_image(
                             lambda: [torch.Generator(ctx.device).manual_seed(i) for i in range(n)], name, u8)))
        ctx.save()
    done = {r["name"]: r for r in rows}
    if all(name in done for name in NAMES):
        total = sum(done[name]["ms_per_image"] for name in NAMES)
        per_image = sum(done[name]["ms_per_image_per_image_generators"] for name in NAMES)
        ctx.result["fifteen"] = dict(ms_per_image=total, ms_per_image_per_image_generators=per_image,
                                     ms_per_image_uint8=sum(done[name]["ms_per_image_uint8"] for name in NAMES),
                                     original_ms_per_image=ORIGINAL_MS_PER_IMAGE_15,
                                     speedup=ORIGINAL_MS_PER_IMAGE_15 / total,
                                     speedup_per_image_generators=ORIGINAL_MS_PER_IMAGE_15 / per_image)


def _speed_groups(groups: tuple[Group, ...], plan: Plan, ctx: Context) -> None:
    import gc

    from benchmarks.speed import measure

    done = ctx.result.setdefault("groups", [])
    for i, g in enumerate(groups):
        label = f"{g.model} {g.setting}"
        if ctx.left() <= 0:
            ctx.cut_short(label)
            continue
        # Each table gets its weight's share of what is left, so a slow one
        # cannot starve the ones after it.
        share = ctx.left() * g.weight / sum(h.weight for h in groups[i:])
        res = measure(g.model, list(g.methods), batch_size=g.batch, device=ctx.device, options=g.options,
                      repeats=plan.repeats, deadline=time.perf_counter() + share)
        done.append(dict(model=g.model, batch=g.batch, setting=g.setting, options=g.options, **res))
        if any(e.startswith("not run") for e in res["errors"].values()):
            ctx.cut_short(f"some methods of {label}")
        ctx.save()
        gc.collect()
        if ctx.device.startswith("cuda"):
            torch.cuda.empty_cache()


def section_speed(plan: Plan, ctx: Context) -> None:
    _speed_groups(plan.speed, plan, ctx)


def section_compile(plan: Plan, ctx: Context) -> None:
    _speed_groups(plan.compile, plan, ctx)


def section_data_path(plan: Plan, ctx: Context) -> None:
    from benchmarks import data_path
    from benchmarks.upsampled_images import write_image_folder, write_imagenet_c_tree

    d = plan.data
    work = ctx.work / "data_path"
    t0 = time.perf_counter()
    tree, folder = work / "ImageNet-C", work / "images"
    write_imagenet_c_tree(tree, d.corruptions, d.per_class, size=d.size, device=ctx.device, wnids=d.wnids)
    # files a little larger than the input, as ImageNet's (imagefolder_c crops 0.875)
    write_image_folder(folder, d.per_class, size=round(d.size / 0.875), wnids=d.wnids)
    ctx.result.update(build_s=time.perf_counter() - t0, rows=[])
    common = [f"model={d.model}", *d.overrides, "method=tent", f"run.device={ctx.device}",
              f"run.batch_size={d.batch}", f"data.corruptions=[{','.join(d.corruptions)}]",
              f"data.num_images={d.num_images}", *([f"run.num_threads={plan.threads}"] if plan.threads else []),
              # class-name folders (the 10-class quick model) are numbered in sorted order
              *([] if d.wnids else ["data.class_index=folder"])]
    runs = [(f"imagenetc, {w} worker{'s' if w != 1 else ''}", ["data=imagenetc", f"data.root={tree}", "data.cache_mb=0",
                                         f"data.num_workers={w}"]) for w in d.workers]
    runs.append(("imagefolder_c (on the fly)", ["data=imagefolder_c", f"data.root={folder}",
                                                f"data.num_workers={max(d.workers)}"]))
    for i, (label, extra) in enumerate(runs):
        if ctx.left() <= 0:
            ctx.cut_short(label)
            continue
        ctx.result["rows"].append(dict(label=label, **data_path.measure([*common, *extra], work / f"run_{i}")))
        ctx.save()
    files = sorted(tree.rglob("*.JPEG"))[: d.decode_files]
    if ctx.left() > 0:
        ctx.result["decode"] = data_path.jpeg_decode_rates(files, ctx.device)
    else:
        ctx.cut_short("JPEG decoding rates")


SECTION_FUNCTIONS: dict[str, Callable[[Plan, Context], None]] = {
    "cuda_tests": section_cuda_tests, "corruptions": section_corruptions, "speed": section_speed,
    "data_path": section_data_path, "compile": section_compile,
}


def _environment(device: str) -> dict:
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, threads=torch.get_num_threads())
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 1))
    return env


def run_child(args: argparse.Namespace) -> None:
    """The ``--child`` process: one section, its results saved to the fragment."""
    plan = _quick_plan() if args.quick else _full_plan()
    if plan.threads:
        torch.set_num_threads(plan.threads)
    ctx = Context(args.device, time.perf_counter() + args.budget_s, Path(args.work), Path(args.fragment))
    ctx.result["env"] = _environment(args.device)
    ctx.save()
    SECTION_FUNCTIONS[args.child](plan, ctx)
    ctx.result["finished"] = True
    ctx.save()


# ----------------------------------------------------------------------------------
# The parent: sections one after another, each under a hard time limit
# ----------------------------------------------------------------------------------


def run_section(cmd: list[str], fragment: Path, budget_s: float, timeout_s: float, log: Path) -> dict:
    """Run a section's process ``cmd``; its entry of the report: status (ok,
    partial, failed, timed out), seconds, the results it saved to ``fragment``
    (also those of a process that failed or was killed), and the error."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        # A session of its own: on timeout the whole group goes (pytest, DataLoader workers).
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    result = json.loads(fragment.read_text()) if fragment.exists() else {}
    entry = dict(seconds=round(time.perf_counter() - t0, 1), budget_s=budget_s, result=result)
    tail = log.read_text(errors="replace")[-3000:]
    if rc is None:
        entry.update(status="timed out", error=f"killed after {timeout_s:.0f} s (budget {budget_s:.0f} s + grace)",
                     log_tail=tail)
    elif rc != 0:
        last = [line for line in tail.splitlines() if line.strip()]
        entry.update(status="failed", error=last[-1] if last else f"exit code {rc}", log_tail=tail)
    else:
        entry["status"] = "partial" if result.get("not_run") else "ok"
    return entry


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the CPU run of the test suite)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--work", default=None, help="parent of the temporary work folder (default: the system's)")
    ap.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--fragment", help=argparse.SUPPRESS)
    ap.add_argument("--budget-s", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args)
        return 0

    from benchmarks.common import cpu_model

    plan = _quick_plan() if args.quick else _full_plan()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(meta=dict(date=time.strftime("%Y-%m-%d"), command="python -m benchmarks.gpu_check " +
                            " ".join(sys.argv[1:]), mode="quick" if args.quick else "full", device=args.device,
                            cpu=cpu_model(), cores=os.cpu_count(), commit=_git_commit(), total_budget_s=plan.total_s),
                  sections={})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tta_gpu_check_", dir=args.work) as work:
        for name in args.sections:
            left = plan.total_s - (time.perf_counter() - start)
            if left < 5:
                report["sections"][name] = dict(status="not run", error="the total budget was spent", result={})
                continue
            budget = min(plan.budgets[name], left)
            fragment = Path(work) / f"{name}.json"
            cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out), "--child", name,
                   "--device", args.device, "--work", work, "--fragment", str(fragment), "--budget-s", str(budget),
                   *(["--quick"] if args.quick else [])]
            entry = run_section(cmd, fragment, budget, budget + plan.grace_s, Path(work) / f"{name}.log")
            report["sections"][name] = entry
            report["meta"]["seconds"] = round(time.perf_counter() - start, 1)
            write_atomic(out / "gpu_check.json", json.dumps(report, indent=1, default=str))
            write_atomic(out / "gpu_check.md", render_markdown(report))
            print(f"{name}: {entry['status']} in {entry['seconds']:.0f} s" +
                  (f" ({entry['error']})" if entry.get("error") else ""), flush=True)
    print(f"results in {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if all(e["status"] in ("ok", "partial") for e in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
