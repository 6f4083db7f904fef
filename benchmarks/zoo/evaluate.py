"""How a zoo model is scored before export: clean accuracy and the source error on
the severity-5 stream of the method table."""

from __future__ import annotations

import statistics

from torch import nn

from benchmarks.common import EIGHT, method_table_stream, error_rate
from benchmarks.zoo.data import decode_split


def evaluate(model: nn.Module, seed: int) -> dict:
    """Clean accuracy on the 10k test images and source error on the 8 severity-5
    corruptions of benchmarks/methods_cifar10c.py (10k images each, its seeded stream).
    CLIP models are scored zero-shot with the single prompt "a photo of a {}." (where
    TPT and RLCF start) and, on clean images, also with the 80-template ensemble."""

    model.eval()
    x, y = decode_split("test")
    clean_acc = 100.0 - error_rate(model, x, y)
    print(f"clean accuracy: {clean_acc:.2f}%", flush=True)
    extra = {}
    if hasattr(model, "clip"):
        from tta.models.zoo import zoo_clip_classifier

        ensemble = zoo_clip_classifier(model.clip, model.tokenizer, templates="clip80")
        extra["clean_accuracy_clip80_templates"] = round(100.0 - error_rate(ensemble, x, y), 2)
        print(f"clean accuracy, 80 templates: {extra['clean_accuracy_clip80_templates']:.2f}%", flush=True)
    errors = {}
    domains = method_table_stream(EIGHT, 10000, seed)
    for name, xc, yc in domains:
        errors[name] = error_rate(model, xc, yc)
        print(f"  {name}: {errors[name]:.2f}%", flush=True)
    return dict(
        clean_accuracy=round(clean_acc, 2),
        **extra,
        corruption_error_sev5={k: round(v, 2) for k, v in errors.items()},
        corruption_error_sev5_mean=round(statistics.mean(errors.values()), 2),
    )
