"""Train (or fine-tune) a model of tta's offline model zoo on the shared CIFAR-10 JPEGs.

    TTA_HOME=../shared python -m benchmarks.zoo.train resnet20_bn_jpeg --epochs 10

Plain PyTorch, CPU-friendly and seeded. The train split is decoded once into a uint8
tensor in memory; augmentation (random crop with 4-px zero padding, horizontal flip;
AugMix on top for entries that ask for it) runs on whole batches of tensors.
Schedule: a short linear warm-up (``--warmup-steps``), then cosine decay of the
learning rate to 0, stepped every batch.

Classifiers: cross-entropy; SGD, momentum 0.9, Nesterov, weight decay (on conv/linear
weights; none on norm parameters and biases). ``vit_tiny_ln`` (a ViT from scratch):
AdamW, weight decay 0.05 (none on norms, biases and the position embedding), half
of the tokens dropped at random in each training step (PatchDropout), and the loss
half cross-entropy, half KL to a teacher's (``zoo:resnet20_bn_jpeg``) softmax on the
same augmented batch (``--distill-weight``). Any classifier can be given a teacher
(``--teacher zoo:NAME``, e.g. to regularise a net that fits its train split far
better than its test split; several names distil from their mean softmax) and label
smoothing (``--label-smoothing``); an option an entry has no use for is refused.
``--teacher-targets fixed`` computes the teacher's targets once, before training, on
each un-augmented train image and its mirror image (averaged; cached in the work dir)
instead of on every augmented batch: a slow or ensemble teacher then costs one pass
over the train split instead of one per epoch, and its target is flip-invariant.
``--swa-epochs N`` (stochastic weight averaging, Izmailov et al. 2018) holds the
learning rate at ``--swa-lr`` for the last N epochs, averages the weights reached at
the end of each, recomputes the BatchNorm statistics of that average on one pass
over the train split, and evaluates and exports the average.

CLIP models (``clip_small``, ``clip_base``): an open_clip ``CLIP`` whose image tower is
a CIFAR ResNet initialised from trained weights, and a text tower trained from
scratch on captions made from the class names and CLIP's 80 templates (one random
template per image and step). With class names and neutral templates only, a text
tower learns to ignore everything but the class name, and a learnable prompt (TPT,
RLCF) then has nothing to act on. ``clip_small`` (the policy) therefore also learns
from captions that describe an edit made to the image (``ATTRIBUTES``: black and
white, dark, close-up, small; none of them a benchmark corruption), as real
captions describe more than the class. The loss is the symmetric image-text
contrastive loss with every caption of the batch that has the image's class (and,
for ``clip_small``, its edit) a positive (UniCL, Yang et al. 2022: with 10 classes
most of a batch shares a class). ``--locked-epochs`` first train with the
image tower locked except its projection (LiT, Zhai et al. 2022), so the random
text tower cannot wreck the trained image features; then everything trains, the
image tower at ``--image-lr``. AdamW (weight decay on matrices only).

The run is resumable: ``<work-dir>/last.pt`` (default ``outputs/zoo/<name>/``) holds
the model, optimiser, scheduler, epoch and RNG states and is written at the end of
every epoch (and when ``--max-steps`` stops a run); running the same command again
continues from it (``--restart`` ignores it).

``--init zoo:<name>`` starts from the weights of a model already in the zoo instead of
the entry's builder: a further stage of training with a fresh optimiser and schedule
(with ``zoo:<name>`` the same model, "train longer"). The manifest then keeps the
earlier stage's record (command, hyper-parameters, wall time, accuracy) under
``previous_stages``, and ``total_wall_time_s`` sums all stages.

Every record lists under ``inputs`` the trained weights the run read (where it
started and its teacher) by sha256: the zoo models build on one another
(``resnet26_gn``, ``clip_small`` and ``vit_tiny_ln``'s teacher are
``resnet20_bn_jpeg``), and retraining one must not rewrite the history of the others.
A resume refuses to go on with a teacher that was retrained in between.

At the end the script evaluates clean test accuracy (all 10k test images) and the
source error on the 8 severity-5 corruptions of the method table
(``benchmarks.common.method_table_stream``, all 10k test images each), saves fp16 weights to
``tta/models/zoo_weights/<name>.pt`` (the package's zoo folder) and records everything
in ``tta/models/zoo_weights/manifest.json``, which ``tta.load_model("zoo:<name>")``
reads.

Adding a zoo model = adding an entry to ``ZOO`` (``entries.py``: a builder and
default hyper-parameters) and its architecture to ``tta.models.zoo``. The pieces:
``entries`` (the models), ``hparams`` (defaults + options), ``data`` (train split,
crop + flip), ``teachers`` (distillation), ``captions`` (CLIP's contrastive
training), ``optim`` (optimisers, schedules, SWA), ``loop`` (epochs, resume),
``evaluate``, ``provenance`` (inputs, stages, the record) and ``export``; this file
is the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

import tta

from benchmarks.zoo.captions import make_captions
from benchmarks.zoo.data import decode_split
from benchmarks.zoo.entries import ZOO
from benchmarks.zoo.evaluate import evaluate
from benchmarks.zoo.export import MANIFEST, export
from benchmarks.zoo.hparams import resolve_hparams
from benchmarks.zoo.loop import Objective, RunState, averaged_model, steps_per_epoch, train
from benchmarks.zoo.optim import make_optimizer, schedule
from benchmarks.zoo.provenance import init_stages, run_inputs, training_record
from benchmarks.zoo.teachers import MeanSoftmax, fixed_teacher_targets, teacher_names


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(ZOO))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--locked-epochs", type=int, default=None, help="CLIP: epochs with the image tower locked")
    parser.add_argument("--image-lr", type=float, default=None, help="CLIP: learning rate of the image tower")
    parser.add_argument("--patch-drop", type=float, default=None, help="ViT: fraction of tokens dropped per step")
    parser.add_argument("--distill-weight", type=float, default=None,
                        help="weight of the KL to the teacher's predictions (the rest on the labels)")
    parser.add_argument("--teacher", default=None, nargs="+", metavar="MODEL",
                        help="classifiers: distil from this tta model (e.g. zoo:resnet20_bn_jpeg), "
                             "or from the mean softmax of several, instead of the entry's teacher (if any)")
    parser.add_argument("--teacher-targets", default=None, choices=("batch", "fixed"),
                        help="batch (default): the teacher's softmax on each augmented batch; fixed: "
                             "on each un-augmented train image and its mirror, computed once")
    parser.add_argument("--label-smoothing", type=float, default=None,
                        help="classifiers: label smoothing of the cross-entropy (default 0)")
    parser.add_argument("--swa-epochs", type=int, default=None, metavar="N",
                        help="classifiers: stochastic weight averaging: the last N epochs run at the "
                             "constant --swa-lr and the model exported is the average of their weights "
                             "(BatchNorm statistics recomputed)")
    parser.add_argument("--swa-lr", type=float, default=None,
                        help="the constant learning rate of the SWA epochs (default: half of --lr)")
    parser.add_argument("--init", default=None, metavar="zoo:NAME",
                        help="start from this zoo model's weights (a further training stage) "
                             "instead of the entry's builder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", default=None, help="default outputs/zoo/<name>/")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many optimiser steps (timing runs); "
                             "saves the resume checkpoint, skips evaluation and export")
    parser.add_argument("--restart", action="store_true", help="ignore an existing resume checkpoint")
    parser.add_argument("--no-export", action="store_true", help="evaluate but do not write checkpoints/")
    return parser



def fixed_targets(teacher: nn.Module, teacher_inputs: dict[str, str], x_train: Tensor, y_train: Tensor,
                  cache: Path) -> Tensor:
    """``fixed_teacher_targets`` of the train split, cached in the work dir under the
    teachers' sha256s: for an ensemble teacher this pass takes as long as a few epochs."""
    cached = torch.load(cache, map_location="cpu", weights_only=True) if cache.exists() else {}
    if cached.get("inputs") == teacher_inputs and cached["targets"].shape[0] == x_train.shape[0]:
        return cached["targets"]
    t_targets = time.perf_counter()
    targets = fixed_teacher_targets(teacher, x_train)
    torch.save(dict(inputs=teacher_inputs, targets=targets), cache)
    print(f"teacher targets: {time.perf_counter() - t_targets:.0f} s, train accuracy "
          f"{100 * (targets.argmax(1) == y_train).float().mean():.2f}%", flush=True)
    return targets


def main() -> None:
    args = make_parser().parse_args()
    entry = ZOO[args.name]
    hp = resolve_hparams(args.name, args)
    teachers = teacher_names(hp.get("teacher", entry.teacher))
    inputs = run_inputs(entry, args.init, teachers)
    previous_stages = []
    if args.init is not None:
        previous_stages = init_stages(args.init, entry)
        hp["init"] = args.init  # part of the hyper-parameters: a resume must start from the same weights
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # before building the model: its new layers draw from it
    work_dir = Path(args.work_dir or Path("outputs") / "zoo" / args.name)
    work_dir.mkdir(parents=True, exist_ok=True)
    resume_path = work_dir / "last.pt"

    t0 = time.perf_counter()
    x_train, y_train = decode_split("train")
    print(f"decoded {x_train.shape[0]} train images in {time.perf_counter() - t0:.0f} s", flush=True)
    model = tta.load_model(args.init).train() if args.init else entry.build(entry.warm_start)
    if hp.get("patch_drop"):
        from timm.layers import PatchDropout

        # training only (PatchDropout is the identity in eval mode); no parameters, so
        # the exported state_dict is that of the plain architecture
        model.backbone.patch_drop = PatchDropout(hp["patch_drop"], num_prefix_tokens=0)
    teacher = MeanSoftmax(teachers) if teachers else None
    optimizer = make_optimizer(model, entry, hp)
    state = RunState(model, optimizer, schedule(optimizer, hp, steps_per_epoch(x_train, hp)),
                     AveragedModel(model) if hp.get("swa_epochs") else None,
                     torch.Generator().manual_seed(args.seed), hp, previous_stages, inputs)
    if resume_path.exists() and not args.restart:
        state.resume(resume_path, teachers)

    objective = Objective(entry, hp, teacher=teacher)
    if teacher is not None and hp.get("teacher_targets") == "fixed" and state.epoch < hp["epochs"]:
        objective.targets = fixed_targets(teacher, {name: state.inputs[name] for name in teachers},
                                          x_train, y_train, work_dir / "teacher_targets.pt")
    print(f"{args.name}: {hp}, {steps_per_epoch(x_train, hp)} steps/epoch, {args.threads} threads", flush=True)
    if entry.clip:
        objective.captions = make_captions(model, entry.attribute_captions)
    if train(state, objective, x_train, y_train, resume_path, args.max_steps):
        print("not evaluating or exporting: --max-steps run", flush=True)
        return
    if state.average is not None:
        model = averaged_model(state.average, x_train, hp["batch_size"], args.seed)

    t_eval = time.perf_counter()
    metrics = evaluate(model, args.seed)
    print(f"evaluation took {time.perf_counter() - t_eval:.0f} s", flush=True)
    record = training_record(entry, hp, teachers, command="python -m benchmarks.zoo.train " + " ".join(sys.argv[1:]),
                             seed=args.seed, threads=args.threads, inputs=state.inputs,
                             train_seconds=state.train_seconds, previous_stages=state.previous_stages,
                             metrics=metrics)
    if args.no_export:
        print(json.dumps(record, indent=2))
        return
    path = export(args.name, entry, model, record)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and {MANIFEST}", flush=True)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
