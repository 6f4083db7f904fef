"""Which parameters a method adapts: the affine parameters of norm layers, and the
modules the papers leave frozen (SAR's and DeYO's top blocks), plus the SAR paper's
learning-rate rule that depends on the model family."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Sequence

from torch import nn

from .norm_layers import NORM_LAYERS


def _matches(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def select_norm_params(model: nn.Module, skip: Sequence[str] = ()) -> list[tuple[str, nn.Parameter]]:
    """Affine parameters (weight, bias) of every BatchNorm/LayerNorm/GroupNorm layer,
    except those inside a module whose qualified name is in ``skip`` (prefix match on
    whole name segments: ``"layer4"`` skips ``layer4.0.bn1`` but not ``layer40``)."""
    chosen = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, NORM_LAYERS) or _matches(mod_name, skip):
            continue
        for p_name, param in module.named_parameters(recurse=False):
            if p_name in ("weight", "bias"):
                chosen.append((f"{mod_name}.{p_name}" if mod_name else p_name, param))
    return chosen


def select_weights_and_biases(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every parameter that a module holds under the name ``weight`` or ``bias``:
    what the official CoTTA, RMT and AdaContrast code trains (its ``collect_params``
    keeps a module's own parameters named ``weight`` or ``bias``). Everything else
    stays frozen, as there: a ViT's class token and position embedding, layer-scale
    ``gamma``, Swin's relative position bias tables, ``nn.MultiheadAttention``'s
    ``in_proj_weight``/``in_proj_bias`` (torchvision's ViT). On a ResNet this is
    every parameter."""
    return [(name, p) for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in ("weight", "bias")]


def last_stage_prefixes(model: nn.Module) -> list[str]:
    """Module names of the top of the network, which DeYO and SAR leave frozen: the
    last ``layerN`` stage of a ResNet, or the last quarter of a ViT's ``blocks`` plus
    its final norm (blocks 9-11 and ``norm`` of a 12-block ViT-B).

    Deep features are the least shifted by low-level corruptions and the most fragile
    under noisy entropy gradients, hence the papers' choice. Returns ``[]`` when the
    architecture is not recognised (then every norm layer adapts)."""
    modules = dict(model.named_modules())
    names = list(modules)
    stages: dict[str, int] = {}
    for n in names:
        m = re.search(r"(?:^|\.)layer(\d+)$", n)
        if m:
            stages[n] = int(m.group(1))
    if stages:
        top = max(stages.values())
        return sorted(n for n, i in stages.items() if i == top)
    blocks = [n for n in names if re.search(r"(^|\.)blocks\.\d+$", n)]
    if blocks:
        parent = blocks[0].rsplit("blocks.", 1)[0]
        count = len([b for b in blocks if b.startswith(parent + "blocks.")])
        first_skipped = count - max(1, count // 4)
        skipped = [f"{parent}blocks.{i}" for i in range(first_skipped, count)]
        for final in ("norm", "fc_norm"):
            if isinstance(modules.get(f"{parent}{final}"), NORM_LAYERS):
                skipped.append(f"{parent}{final}")
        return skipped
    return []


#: Substrings of the module names that SAR's and DeYO's official code freezes
#: (``collect_params``: "layer4 for ResNets and blocks9-11 for Vit-Base"), plus the
#: network's final ``norm``, matched exactly.
PAPER_FROZEN_SUBSTRINGS = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")


def paper_frozen_modules(model: nn.Module) -> list[str]:
    """Module names that SAR's and DeYO's official code leaves frozen, applied as
    that code applies them: a module is frozen when its name (relative to the
    network, i.e. inside tta's ``backbone``) contains ``layer4``, ``blocks.9``,
    ``blocks.10`` or ``blocks.11``, or is the top-level ``norm``. What that freezes:

    - torchvision/timm ResNets (``layer1``-``layer4``): ``layer4``.
    - CIFAR ResNets (three stages, ``layer1``-``layer3``): nothing; every norm layer adapts.
    - ViT/DeiT (``blocks.N``, any depth): blocks 9, 10, 11 and the final ``norm``
      (on ViT-B the last quarter; on a 24-block ViT-L the same three middle blocks).
    - Hierarchical nets with ``stages.S.blocks.N`` / ``layers.S.blocks.N`` (ConvNeXt,
      Swin, EfficientFormer, ...): blocks 9-11 of any stage that deep, and a
      top-level ``norm`` (Swin); otherwise nothing.
    - Anything else (RegNet, MobileNet, GhostNet, ...): nothing.

    :func:`last_stage_prefixes` is the alternative rule (the deepest stage)."""
    root = "backbone." if isinstance(getattr(model, "backbone", None), nn.Module) else ""
    frozen = []
    for name, _ in model.named_modules():
        if not name.startswith(root):
            continue
        relative = name[len(root):]
        if relative == "norm" or any(part in relative for part in PAPER_FROZEN_SUBSTRINGS):
            frozen.append(name)
    return frozen


def frozen_top(model: nn.Module, freeze: str | Sequence[str]) -> list[str]:
    """The modules SAR/DeYO keep frozen: ``"paper"`` (:func:`paper_frozen_modules`),
    ``"last_stage"`` (:func:`last_stage_prefixes`), ``"none"``, or explicit names."""
    if isinstance(freeze, str):
        rules = {"paper": paper_frozen_modules, "last_stage": last_stage_prefixes, "none": lambda m: []}
        if freeze not in rules:
            raise ValueError(f"skip_modules must be one of {sorted(rules)} or a list of module names, got {freeze!r}")
        return rules[freeze](model)
    names = list(freeze) if isinstance(freeze, Iterable) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise TypeError(f"skip_modules must be 'none', 'paper', 'last_stage' or a list of module names, got {freeze!r}")
    # A name that is no module of the model would freeze nothing, silently (a name
    # of the bare network on a tta classifier, whose modules start with 'backbone.').
    modules = [name for name, _ in model.named_modules() if name]
    for name in names:
        if name not in modules:
            close = [m for m in modules if m.endswith("." + name)][:3]
            close += [m for m in difflib.get_close_matches(name, modules, n=3, cutoff=0.5) if m not in close]
            close = close[:3]
            raise ValueError(f"skip_modules: the model has no module {name!r}"
                             + (f"; did you mean {' or '.join(map(repr, close))}?" if close else ""))
    return names


def uses_transformer_lr(model: nn.Module) -> bool:
    """Whether the papers' ViT learning-rate rule applies: every norm layer of the
    model is a LayerNorm (ViT, DeiT, Swin, Mixer, ConvNeXt); BatchNorm and
    GroupNorm nets (the papers' ResNet-50s) get the ResNet rule."""
    norms = [m for m in model.modules() if isinstance(m, NORM_LAYERS)]
    return bool(norms) and all(isinstance(m, nn.LayerNorm) for m in norms)


def sar_paper_lr(model: nn.Module, batch_size: int, double_at_batch_size_1: bool = True) -> float:
    """SAR's and DeYO's official learning rates (SGD, momentum 0.9): ``1e-3 * B / 64``
    for ViTs; for ResNets ``2.5e-4`` from batch 32 up and ``2.5e-4 / 64 * B * 2``
    below; doubled again at batch size 1 ("double lr for sar under bs=1")."""
    if uses_transformer_lr(model):
        lr = 1e-3 * batch_size / 64
    else:
        lr = 2.5e-4 if batch_size >= 32 else 2.5e-4 / 64 * batch_size * 2
    return 2 * lr if batch_size == 1 and double_at_batch_size_1 else lr


def nothing_to_adapt_message(model: nn.Module, method: str) -> str:
    """Why method ``method`` found no parameter to adapt in ``model``, and what to do."""
    norms = [m for m in model.modules() if isinstance(m, NORM_LAYERS)]
    if any(p.numel() for m in norms for p in m.parameters(recurse=False)):
        why = ("every norm layer of the model is frozen by this method's choice of layers; "
               "pass skip_modules='none' to adapt them all")
    elif norms:
        why = (f"the model's norm layers ({len(norms)}) have no affine parameters (built with "
               "affine=False / elementwise_affine=False), and those are what it adapts")
    else:
        why = ("the model has no BatchNorm, LayerNorm or GroupNorm layer with affine "
               "parameters (a norm-free net such as timm's nf_* and normfree models, or a "
               "plain conv net), and those are what it adapts")
    return (f"{method}: nothing to adapt: {why}. On such a model use method 'source' "
            "(no adaptation), or choose a model with norm layers")
