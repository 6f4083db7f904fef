"""tta: test-time adaptation for vision models.

>>> import tta
>>> model = tta.load_model("cifar10_resnet20")
>>> adapted = tta.wrap(model, "tent", lr=1e-3)
>>> logits = adapted(x)   # predicts and adapts on x (float RGB in [0, 1], NCHW)
>>> adapted.reset()       # back to the source weights
"""

from . import methods, models
from .methods import (
    StepRecord,
    TTAMethod,
    list_methods,
    method_defaults,
    method_presets,
    register_method,
    wrap,
)
from .models import list_models, load_model, register_model
from .paths import tta_home

__version__ = "0.1.0"

__all__ = [
    "StepRecord",
    "TTAMethod",
    "list_methods",
    "list_models",
    "load_model",
    "method_defaults",
    "method_presets",
    "methods",
    "models",
    "register_method",
    "register_model",
    "tta_home",
    "wrap",
    "__version__",
]


def __getattr__(name: str):
    # Heavier submodules load on first use so `import tta` stays light.
    if name in ("corruptions", "augment", "data"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'tta' has no attribute {name!r}")
