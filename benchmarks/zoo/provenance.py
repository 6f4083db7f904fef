"""Provenance of a zoo run: the trained weights it reads (by sha256), the stages
before it, and the record its manifest entry keeps."""

from __future__ import annotations

import datetime

import torch

from benchmarks.common import cpu_model
from benchmarks.zoo.captions import ATTRIBUTES
from benchmarks.zoo.entries import ZooEntry
from benchmarks.zoo.hparams import swa_start


def init_stages(init: str, entry: ZooEntry) -> list[dict]:
    """The training stages behind zoo model ``init`` (its own record first), checked
    to be of ``entry``'s architecture: the provenance a further stage carries on."""
    from tta.models.zoo import zoo_info

    if not init.startswith("zoo:"):
        raise SystemExit(f"--init takes a zoo model (zoo:NAME), not {init!r}")
    info = zoo_info(init.removeprefix("zoo:"))
    if info["architecture"] != entry.architecture:
        raise SystemExit(f"--init {init} is a {info['architecture']}, this entry a {entry.architecture}")
    keys = ("training_command", "hyperparameters", "inputs", "epochs", "wall_time_s", "machine", "date",
            "sha256", "clean_accuracy", "corruption_error_sev5_mean")
    own = {k: info[k] for k in keys if k in info}
    return [own] + list(info.get("previous_stages", []))


def weights_sha256(name: str) -> str:
    """sha256 of the weights ``tta.load_model(name)`` reads (a zoo model or a shared
    CIFAR ResNet): a run's record names its inputs by content, since a zoo model that
    another was started from, or distilled from, may later be retrained."""
    from tta.models import cifar_resnet_weights
    from tta.models.zoo import zoo_info
    from tta.paths import sha256_of

    if name.startswith("zoo:"):
        return zoo_info(name.removeprefix("zoo:"))["sha256"]
    if name.startswith("cifar10_resnet"):
        return sha256_of(cifar_resnet_weights(int(name.removeprefix("cifar10_resnet"))))
    raise ValueError(f"no weights file known for {name!r}")


def run_inputs(entry: ZooEntry, init: str | None, teachers: list[str]) -> dict[str, str]:
    """The trained weights a run reads, name -> sha256: where it starts (``--init`` or
    the entry's warm start) and its teachers."""
    names = [init or entry.warm_start, *teachers]
    return {name: weights_sha256(name) for name in names if name}



def training_record(entry: ZooEntry, hp: dict, teachers: list[str], *, command: str, seed: int, threads: int,
                    inputs: dict[str, str], train_seconds: float, previous_stages: list[dict],
                    metrics: dict) -> dict:
    """The manifest record of a finished run: how to repeat it (command and the full
    recipe in words), what it read, how long it took where, and its scores."""
    swa_epochs = hp.get("swa_epochs", 0)
    return dict(
        training_command=f"TTA_HOME=<shared> {command}",
        hyperparameters=dict(
            hp,
            optimizer="AdamW (0.9, 0.98)" if entry.clip else
                      "AdamW (0.9, 0.999)" if entry.optimizer == "adamw" else "SGD momentum 0.9 nesterov",
            **(dict(teacher=" + ".join(teachers) + (" (mean softmax)" if len(teachers) > 1 else "")
                    + (" (KL to its softmax on the un-augmented image and its mirror, averaged, computed once)"
                       if hp.get("teacher_targets") == "fixed" else
                       " (KL to its softmax on the same augmented batch)"))
               if teachers else {}),
            schedule=(f"linear warm-up, per-step cosine to swa_lr by epoch {swa_start(hp)}, then constant swa_lr; "
                      f"exported: the mean of the weights at the end of each of the last {swa_epochs} epochs "
                      "(SWA), BatchNorm statistics recomputed on one augmented pass over the train split"
                      if swa_epochs else "linear warm-up then per-step cosine to 0"),
            augmentation="random crop (4 px zero pad) + horizontal flip" + (" + AugMix severity 3" if entry.augmix else ""),
            **(dict(loss="symmetric contrastive, captions of the same class (and edit) positive (UniCL); "
                          "captions: CIFAR-10 class names x CLIP's 80 templates"
                          + (" (neutral ones) or x edit captions: " + ", ".join(ATTRIBUTES)
                             if entry.attribute_captions else ""),
                    locked="image tower locked but its projection for locked_epochs (LiT)") if entry.clip else {}),
            seed=seed),
        inputs=inputs,
        epochs=hp["epochs"],
        wall_time_s=round(train_seconds),
        **(dict(previous_stages=previous_stages,
                total_epochs=hp["epochs"] + sum(s["epochs"] for s in previous_stages),
                total_wall_time_s=round(train_seconds) + sum(s["wall_time_s"] for s in previous_stages))
           if previous_stages else {}),
        machine=dict(cpu=cpu_model(), threads=threads, torch=torch.__version__),
        date=datetime.date.today().isoformat(),
        **metrics,
    )
