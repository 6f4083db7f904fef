"""The training loop of a zoo run: seeded epochs over the train split, the resume
checkpoint written after each (and where ``--max-steps`` stops), and the weight
average an SWA run exports."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from tta.augment.views import augmix

from benchmarks.zoo.captions import Captions, contrastive_loss, set_image_locked
from benchmarks.zoo.data import augment
from benchmarks.zoo.entries import ZooEntry
from benchmarks.zoo.hparams import swa_start
from benchmarks.zoo.optim import swa_model


def steps_per_epoch(x_train: Tensor, hp: dict) -> int:
    return x_train.shape[0] // hp["batch_size"]  # drop the last partial batch


@dataclass
class Objective:
    """What one step minimises: the augmented batch's cross-entropy (mixed with the
    KL to a teacher's softmax when there is one), or for CLIP the contrastive loss."""

    entry: ZooEntry
    hp: dict
    captions: Captions | None = None  # CLIP
    teacher: nn.Module | None = None
    targets: Tensor | None = None  # the teacher's fixed targets, one per train image

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        model.train()
        if self.entry.clip:
            set_image_locked(model, epoch < self.hp["locked_epochs"])

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, idx: Tensor,
                 gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Loss and logits on the uint8 train images ``x`` (indices ``idx``), labels
        ``y``; every random draw from ``gen``, in a fixed order."""
        xb = augment(x, gen)
        if self.entry.augmix:
            xb = augmix(xb, severity=3.0, generator=gen)
        if self.entry.clip:
            return contrastive_loss(model, xb, y, self.captions, gen)
        logits = model(xb)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hp.get("label_smoothing", 0.0))
        if self.teacher is not None:
            target = self.targets[idx] if self.targets is not None else self.teacher(xb)
            kl = F.kl_div(logits.log_softmax(1), target, reduction="batchmean")
            loss = (1 - self.hp["distill_weight"]) * loss + self.hp["distill_weight"] * kl
        return loss, logits


@dataclass
class RunState:
    """What a run changes as it trains, and what its resume checkpoint holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    average: AveragedModel | None  # SWA
    gen: torch.Generator  # every data-side draw: epoch order, augmentation, captions
    hp: dict
    previous_stages: list[dict]
    inputs: dict[str, str]
    epoch: int = 0
    step: int = 0
    train_seconds: float = 0.0
    perm: Tensor | None = None  # the order of an epoch a --max-steps stop cut short

    def save(self, path: Path, perm: Tensor | None = None) -> None:
        state = dict(
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), generator=self.gen.get_state(),
            torch_rng=torch.get_rng_state(), epoch=self.epoch, step=self.step,
            train_seconds=self.train_seconds, hparams=self.hp, previous_stages=self.previous_stages,
            inputs=self.inputs,
        )
        if perm is not None:
            state["perm"] = perm
        if self.average is not None:
            state["swa"] = self.average.state_dict()
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def resume(self, path: Path, teachers: list[str]) -> None:
        """Continue from the checkpoint at ``path``, refusing one made with other
        hyper-parameters or, before its last epoch, with a teacher retrained since."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt["hparams"] != self.hp:
            raise SystemExit(f"{path} was made with {ckpt['hparams']}, not {self.hp}: "
                             f"pass the same options, or --restart")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        self.epoch, self.step, self.train_seconds = ckpt["epoch"], ckpt["step"], ckpt["train_seconds"]
        if self.average is not None:
            self.average.load_state_dict(ckpt["swa"])
        # read when the run began: by now the manifest may already hold this stage's export
        self.previous_stages = ckpt.get("previous_stages", self.previous_stages)
        started = ckpt.get("inputs", self.inputs)
        for name in teachers:
            if started.get(name, self.inputs[name]) != self.inputs[name] and self.epoch < self.hp["epochs"]:
                raise SystemExit(f"{name} was retrained since {path} was started: "
                                 f"finishing with another teacher would mix two runs; pass --restart")
        self.inputs = started
        self.perm = ckpt.get("perm")
        print(f"resumed from {path}: epoch {self.epoch}, step {self.step}", flush=True)


def train(state: RunState, objective: Objective, x_train: Tensor, y_train: Tensor, resume_path: Path,
          max_steps: int | None) -> bool:
    """Train to the last epoch, saving ``resume_path`` after each; True when
    ``max_steps`` stopped the run first."""
    hp, model = state.hp, state.model
    per_epoch = steps_per_epoch(x_train, hp)
    while state.epoch < hp["epochs"]:
        objective.start_epoch(model, state.epoch)
        # a --max-steps stop mid-epoch stored the epoch's order, so a resumed run
        # continues the same epoch where it stopped
        perm = state.perm if state.perm is not None else torch.randperm(x_train.shape[0], generator=state.gen)
        state.perm = None
        first = state.step - state.epoch * per_epoch
        bar = tqdm(range(first, per_epoch), desc=f"epoch {state.epoch + 1}/{hp['epochs']}",
                   initial=first, total=per_epoch, mininterval=5)
        t_epoch = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        stopped = False
        for i in bar:
            idx = perm[i * hp["batch_size"]:(i + 1) * hp["batch_size"]]
            yb = y_train[idx]
            loss, logits = objective(model, x_train[idx], yb, idx, state.gen)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
            state.scheduler.step()
            state.step += 1
            loss_sum += loss.item() * yb.shape[0]
            correct += (logits.argmax(1) == yb).sum().item()
            seen += yb.shape[0]
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                            lr=f"{max(state.scheduler.get_last_lr()):.4f}", refresh=False)
            if max_steps is not None and state.step >= max_steps:
                stopped = True
                break
        bar.close()
        elapsed = time.perf_counter() - t_epoch
        state.train_seconds += elapsed
        if stopped and state.step < (state.epoch + 1) * per_epoch:
            state.save(resume_path, perm)
            print(f"stopped at step {state.step} (--max-steps): {elapsed / max(1, seen // hp['batch_size']):.3f} "
                  f"s/step, ~{elapsed / max(1, seen) * x_train.shape[0] / 60:.1f} min/epoch", flush=True)
            return True
        state.epoch += 1
        if state.average is not None and state.epoch > swa_start(hp):
            state.average.update_parameters(model)
        state.save(resume_path)
        print(f"epoch {state.epoch}: train loss {loss_sum / max(1, seen):.4f}, train acc "
              f"{100 * correct / max(1, seen):.2f}%, {elapsed:.0f} s", flush=True)
        if stopped:  # --max-steps reached on the last step of an epoch
            return True
    return False


def averaged_model(average: AveragedModel, x_train: Tensor, batch_size: int, seed: int) -> nn.Module:
    """The SWA average with BatchNorm statistics recomputed on one augmented pass over
    the train split, in its own seeded order."""
    t_bn = time.perf_counter()
    bn_gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(x_train.shape[0], generator=bn_gen)
    batches = (augment(x_train[order[i:i + batch_size]], bn_gen) for i in range(0, x_train.shape[0], batch_size))
    model = swa_model(average, tqdm(batches, desc="SWA: BatchNorm statistics", mininterval=5,
                                    total=math.ceil(x_train.shape[0] / batch_size)))
    print(f"averaged the weights of the last {int(average.n_averaged)} epochs "
          f"({time.perf_counter() - t_bn:.0f} s for the BatchNorm statistics)", flush=True)
    return model
