"""Train (or fine-tune) a model of tta's offline model zoo on the shared CIFAR-10 JPEGs.

    TTA_HOME=../shared python benchmarks/zoo/train.py resnet20_bn_jpeg --epochs 10

Plain PyTorch, CPU-friendly and seeded. The train split is decoded once into a uint8
tensor in memory; augmentation (random crop with 4-px zero padding, horizontal flip)
runs on whole batches of tensors. Optimiser: SGD, momentum 0.9, Nesterov, weight
decay 5e-4 (on conv/linear weights; none on BatchNorm parameters and biases).
Schedule: a short linear warm-up (``--warmup-steps``), then cosine decay of the
learning rate to 0, stepped every batch.

The run is resumable: ``<work-dir>/last.pt`` (default ``outputs/zoo/<name>/``) holds
the model, optimiser, scheduler, epoch and RNG states and is written at the end of
every epoch (and when ``--max-steps`` stops a run); running the same command again
continues from it (``--restart`` ignores it).

At the end the script evaluates clean test accuracy (all 10k test images) and the
source error on the 8 severity-5 corruptions of ``benchmarks/methods_cifar10c.py``
(all 10k test images each, the same seeded stream), saves fp16 weights to
``benchmarks/zoo/checkpoints/<name>.pt`` and records everything in
``benchmarks/zoo/checkpoints/manifest.json``, which ``tta.load_model("zoo:<name>")``
reads.

Adding a zoo model = adding an entry to ``ZOO`` (a builder and default
hyper-parameters) and, if it is not a CifarResNet, its architecture to
``tta.models.zoo``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/ for methods_cifar10c

import tta  # noqa: E402
from tta.data import cifar10_dir, load_image_folder  # noqa: E402
from tta.paths import atomic_write_bytes  # noqa: E402

CHECKPOINT_DIR = HERE / "checkpoints"
MANIFEST = CHECKPOINT_DIR / "manifest.json"


# ----------------------------------------------------------------------------------
# Zoo entries: a builder returning an ImageClassifier (float RGB in [0, 1] in,
# normalisation inside) plus default hyper-parameters.
# ----------------------------------------------------------------------------------


@dataclass
class ZooEntry:
    build: Callable[[], nn.Module]
    architecture: str  # key understood by tta.models.zoo (how to rebuild the net)
    description: str
    defaults: dict = field(default_factory=dict)


def _resnet20_pretrained() -> nn.Module:
    return tta.load_model("cifar10_resnet20")


ZOO: dict[str, ZooEntry] = {
    "resnet20_bn_jpeg": ZooEntry(
        build=_resnet20_pretrained,
        architecture="cifar_resnet20",
        description="the shared pretrained CIFAR-10 ResNet-20 (BatchNorm) fine-tuned "
                    "on the shared JPEG train split",
        defaults=dict(epochs=10, lr=0.04, batch_size=128, weight_decay=5e-4, warmup_steps=200),
    ),
}


# ----------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------


def decode_split(split: str) -> tuple[Tensor, Tensor]:
    """All images of a shared CIFAR-10 split as uint8 (N, 3, 32, 32) and labels."""
    return load_image_folder(cifar10_dir(split), shuffle=False, uint8=True)


def augment(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop (``pad`` px zero padding) + horizontal flip of a uint8 batch, by
    one gather: no per-image Python loop. Returns float RGB in [0, 1]."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    cols = torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(0), cols) + ox[:, None]  # (B, W)
    rows = torch.arange(h) + oy[:, None]  # (B, H)
    idx = torch.arange(b)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).float().div_(255)


# ----------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------


@torch.no_grad()
def error_rate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    wrong = 0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        xb = xb.float().div(255) if xb.dtype == torch.uint8 else xb
        wrong += (model(xb).argmax(1) != y[i:i + batch_size]).sum().item()
    return 100.0 * wrong / x.shape[0]


def evaluate(model: nn.Module, seed: int) -> dict:
    """Clean accuracy on the 10k test images and source error on the 8 severity-5
    corruptions of benchmarks/methods_cifar10c.py (10k images each, its seeded stream)."""
    from methods_cifar10c import EIGHT, build_stream

    model.eval()
    x, y = decode_split("test")
    clean_acc = 100.0 - error_rate(model, x, y)
    print(f"clean accuracy: {clean_acc:.2f}%", flush=True)
    errors = {}
    domains = build_stream(EIGHT, 10000, seed)
    for name, xc, yc in domains:
        errors[name] = error_rate(model, xc, yc)
        print(f"  {name}: {errors[name]:.2f}%", flush=True)
    return dict(
        clean_accuracy=round(clean_acc, 2),
        corruption_error_sev5={k: round(v, 2) for k, v in errors.items()},
        corruption_error_sev5_mean=round(statistics.mean(errors.values()), 2),
    )


# ----------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def export(name: str, entry: ZooEntry, model: nn.Module, record: dict) -> Path:
    """fp16 state_dict of the backbone (plain tensors) + a manifest entry."""
    CHECKPOINT_DIR.mkdir(parents=True, exist_ok=True)
    backbone = getattr(model, "backbone", model)
    state = {
        k: (v.detach().half() if v.is_floating_point() else v.detach()).clone().contiguous()
        for k, v in backbone.state_dict().items()
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = CHECKPOINT_DIR / f"{name}.pt"
    atomic_write_bytes(path, data)
    path.chmod(0o644)
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}
    manifest.setdefault("format", 1)
    manifest.setdefault("models", {})
    manifest["models"][name] = dict(
        file=path.name,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        architecture=entry.architecture,
        description=entry.description,
        **record,
    )
    manifest["models"] = dict(sorted(manifest["models"].items()))
    atomic_write_bytes(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    MANIFEST.chmod(0o644)
    return path


# ----------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------


def make_scheduler(optimizer, total_steps: int, warmup_steps: int):
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(ZOO))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", default=None, help="default outputs/zoo/<name>/")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many optimiser steps (timing runs); "
                             "saves the resume checkpoint, skips evaluation and export")
    parser.add_argument("--restart", action="store_true", help="ignore an existing resume checkpoint")
    parser.add_argument("--no-export", action="store_true", help="evaluate but do not write checkpoints/")
    args = parser.parse_args()

    entry = ZOO[args.name]
    hp = dict(entry.defaults)
    for key in hp:
        if getattr(args, key) is not None:
            hp[key] = getattr(args, key)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work_dir = Path(args.work_dir or Path("outputs") / "zoo" / args.name)
    work_dir.mkdir(parents=True, exist_ok=True)
    resume_path = work_dir / "last.pt"
    command = "python benchmarks/zoo/train.py " + " ".join(sys.argv[1:])

    t0 = time.perf_counter()
    x_train, y_train = decode_split("train")
    print(f"decoded {x_train.shape[0]} train images in {time.perf_counter() - t0:.0f} s", flush=True)
    steps_per_epoch = x_train.shape[0] // hp["batch_size"]  # drop the last partial batch
    total_steps = steps_per_epoch * hp["epochs"]

    model = entry.build()
    params_decay = [p for p in model.parameters() if p.ndim > 1]
    params_other = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [dict(params=params_decay, weight_decay=hp["weight_decay"]),
         dict(params=params_other, weight_decay=0.0)],
        lr=hp["lr"], momentum=0.9, nesterov=True,
    )
    scheduler = make_scheduler(optimizer, total_steps, hp["warmup_steps"])
    gen = torch.Generator().manual_seed(args.seed)

    epoch, step, train_seconds, ckpt = 0, 0, 0.0, {}
    if resume_path.exists() and not args.restart:
        ckpt = torch.load(resume_path, map_location="cpu", weights_only=True)
        if ckpt["hparams"] != hp:
            raise SystemExit(f"{resume_path} was made with {ckpt['hparams']}, not {hp}: "
                             f"pass the same options, or --restart")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        epoch, step, train_seconds = ckpt["epoch"], ckpt["step"], ckpt["train_seconds"]
        print(f"resumed from {resume_path}: epoch {epoch}, step {step}", flush=True)

    def save_resume(epoch_done: int, step_done: int, perm: Tensor | None = None) -> None:
        state = dict(
            model=model.state_dict(), optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(), generator=gen.get_state(),
            torch_rng=torch.get_rng_state(), epoch=epoch_done, step=step_done,
            train_seconds=train_seconds, hparams=hp,
        )
        if perm is not None:
            state["perm"] = perm
        tmp = resume_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, resume_path)

    print(f"{args.name}: {hp}, {steps_per_epoch} steps/epoch, {args.threads} threads", flush=True)
    stopped = False
    # A --max-steps stop mid-epoch stores the epoch's permutation, so the resumed run
    # continues the same epoch where it stopped.
    pending_perm = ckpt.get("perm")
    while epoch < hp["epochs"] and not stopped:
        model.train()
        perm = pending_perm if pending_perm is not None else torch.randperm(x_train.shape[0], generator=gen)
        pending_perm = None
        first = step - epoch * steps_per_epoch
        bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{hp['epochs']}",
                   initial=first, total=steps_per_epoch, mininterval=5)
        t_epoch = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for i in bar:
            idx = perm[i * hp["batch_size"]:(i + 1) * hp["batch_size"]]
            xb, yb = augment(x_train[idx], gen), y_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += loss.item() * yb.shape[0]
            correct += (logits.argmax(1) == yb).sum().item()
            seen += yb.shape[0]
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                            lr=f"{scheduler.get_last_lr()[0]:.4f}", refresh=False)
            if args.max_steps is not None and step >= args.max_steps:
                stopped = True
                break
        bar.close()
        elapsed = time.perf_counter() - t_epoch
        train_seconds += elapsed
        if stopped and step < (epoch + 1) * steps_per_epoch:
            save_resume(epoch, step, perm)
            print(f"stopped at step {step} (--max-steps): {elapsed / max(1, seen // hp['batch_size']):.3f} "
                  f"s/step, ~{elapsed / max(1, seen) * x_train.shape[0] / 60:.1f} min/epoch", flush=True)
            break
        epoch += 1
        save_resume(epoch, step)
        print(f"epoch {epoch}: train loss {loss_sum / max(1, seen):.4f}, train acc "
              f"{100 * correct / max(1, seen):.2f}%, {elapsed:.0f} s", flush=True)
    if stopped:
        print("not evaluating or exporting: --max-steps run", flush=True)
        return

    t_eval = time.perf_counter()
    metrics = evaluate(model, args.seed)
    print(f"evaluation took {time.perf_counter() - t_eval:.0f} s", flush=True)
    record = dict(
        training_command=f"TTA_HOME=<shared> {command}",
        hyperparameters=dict(hp, optimizer="SGD momentum 0.9 nesterov",
                             schedule="linear warm-up then per-step cosine to 0",
                             augmentation="random crop (4 px zero pad) + horizontal flip",
                             seed=args.seed),
        epochs=hp["epochs"],
        wall_time_s=round(train_seconds),
        machine=dict(cpu=cpu_model(), threads=args.threads, torch=torch.__version__),
        date=datetime.date.today().isoformat(),
        **metrics,
    )
    if args.no_export:
        print(json.dumps(record, indent=2))
        return
    path = export(args.name, entry, model, record)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and {MANIFEST}", flush=True)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
