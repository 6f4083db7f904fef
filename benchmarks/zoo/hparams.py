"""A run's hyper-parameters: an entry's defaults with the command line's overrides,
and the checks that keep a recorded recipe the one that ran."""

from __future__ import annotations

import argparse

from benchmarks.zoo.entries import ZOO
from benchmarks.zoo.teachers import teacher_names

# command-line options that override an entry's default hyper-parameter of the same name
TUNABLE = ("epochs", "lr", "batch_size", "weight_decay", "warmup_steps", "locked_epochs", "image_lr",
           "patch_drop", "distill_weight")


def _flag(key: str) -> str:
    """The command-line spelling of hyper-parameter ``key`` (``patch_drop`` -> ``--patch-drop``)."""
    return "--" + key.replace("_", "-")


def resolve_hparams(name: str, args: argparse.Namespace) -> dict:
    """``name``'s default hyper-parameters with the command line's overrides. An option
    the entry has no use for (``--patch-drop`` for a ResNet) is an error rather than
    silently ignored, since the record would then claim a recipe that never ran.
    ``--teacher`` and ``--label-smoothing`` add to a classifier's recipe (as
    ``teacher``, with ``distill_weight`` 0.5 unless given, and ``label_smoothing``);
    ``--teacher-targets`` to that of a classifier with a teacher; ``--swa-epochs`` (with
    ``swa_lr`` half the peak lr unless given) to any classifier's."""
    entry = ZOO[name]
    hp = dict(entry.defaults)
    teachers = args.teacher
    added = {"teacher": teachers[0] if teachers and len(teachers) == 1 else teachers,
             "teacher_targets": args.teacher_targets, "label_smoothing": args.label_smoothing,
             "swa_epochs": args.swa_epochs, "swa_lr": args.swa_lr}
    for key, value in added.items():
        if value is None:
            continue
        if entry.clip:
            raise SystemExit(f"{_flag(key)}: {name} trains contrastively, not on labels")
        hp[key] = value
    if args.teacher is not None:
        hp.setdefault("distill_weight", 0.5)
    if args.teacher_targets is not None and not teacher_names(hp.get("teacher", entry.teacher)):
        raise SystemExit(f"--teacher-targets: {name} has no teacher (give one with --teacher)")
    for key in TUNABLE:
        value = getattr(args, key)
        if value is None:
            continue
        if key not in hp:
            usable = ", ".join(_flag(k) for k in TUNABLE if k in hp)
            raise SystemExit(f"{_flag(key)} does not apply to {name} (it takes {usable}"
                             + ("" if entry.clip else "".join(f", {_flag(k)}" for k in added)) + ")")
        hp[key] = value
    if "swa_lr" in hp and "swa_epochs" not in hp:
        raise SystemExit("--swa-lr: give --swa-epochs too (how many of the last epochs to average)")
    if "swa_epochs" in hp:
        if not 1 <= hp["swa_epochs"] <= hp["epochs"]:
            raise SystemExit(f"--swa-epochs {hp['swa_epochs']}: must be between 1 and the run's {hp['epochs']} epochs")
        hp.setdefault("swa_lr", hp["lr"] / 2)  # the SWA paper's constant lr on CIFAR, half the initial one
    return hp


def swa_start(hp: dict) -> int:
    """The epochs before the averaged ones of an SWA run (all of them without SWA)."""
    return hp["epochs"] - hp.get("swa_epochs", 0)
