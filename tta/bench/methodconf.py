"""Method configs (``conf/method/<name>.yaml``) generated from the method registry.

The YAML files mirror :func:`tta.method_defaults` (the Python signatures are the
single source of truth) and take their comments from the methods' docstrings::

    python -m tta.bench.methodconf --check    # exit 1 when a YAML drifted
    python -m tta.bench.methodconf --write    # regenerate conf/method/*.yaml
"""

from __future__ import annotations

import argparse
import inspect
import math
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

__all__ = [
    "NOT_CONFIGURABLE",
    "configurable_defaults",
    "parameter_docs",
    "render_method_yaml",
    "check_method_configs",
    "main",
]

#: Keyword arguments that a YAML cannot or must not set, with the reason.
NOT_CONFIGURABLE: dict[str, dict[str, str]] = {
    # The runner builds this loader from data.source_root (method.fisher_size images).
    "*": {"fisher_loader": "built by tta-bench from data.source_root"},
    # ETA is EATA with fisher_alpha forced to 0 by ETA.__init__; method_defaults
    # still reports EATA's signature (fisher_alpha=2000), which would mislead here.
    "eta": {
        "fisher_alpha": "ETA is EATA without the Fisher regulariser",
        "fisher_size": "ETA is EATA without the Fisher regulariser",
    },
}

# For keys whose docstrings say nothing (kept short; the docstrings win).
_FALLBACK_DOCS = {
    "steps": "Adaptation steps per batch (the prediction comes from the last one).",
    "episodic": "Reset to the source state before every batch.",
    "optimizer": "Optimizer of the adapted parameters: sgd, adam or adamw.",
    "lr": "Learning rate, or paper for the method's published rule (by batch size and model).",
    "momentum": "SGD momentum.",
    "weight_decay": "Weight decay.",
    "betas": "Adam/AdamW betas.",
    "bn_alpha": "Weight of test-batch statistics in BatchNorm layers (1: test statistics only).",
    "check_inputs": "Validate each batch (dtype, shape, finite, in [0, 1]); one host sync per batch.",
}

_NULL_MEANS = {
    "e_margin": "null: 0.4 * ln(num_classes).",
    "deyo_margin": "null: 0.5 * ln(num_classes).",
    "margin_e0": "null: 0.4 * ln(num_classes).",
    "reset_constant": "null: never reset.",
    "occlusion_top": "null: centred.",
    "occlusion_left": "null: centred.",
}


def configurable_defaults(name: str) -> dict[str, Any]:
    """The keys and defaults a ``method`` config holds: :func:`tta.method_defaults`
    minus :data:`NOT_CONFIGURABLE`, tuples as lists (YAML has no tuples)."""
    import tta

    skip = set(NOT_CONFIGURABLE["*"]) | set(NOT_CONFIGURABLE.get(name, {}))
    out = {}
    for key, value in tta.method_defaults(name).items():
        if key in skip:
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _args_section(doc: str) -> dict[str, str]:
    """``{name: description}`` from a Google-style ``Args:`` section; an entry may
    name several parameters (``optimizer, lr, momentum: ...``)."""
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return {}
    entries: dict[str, str] = {}
    current: list[str] | None = None
    indent = None
    for line in lines[start + 1:]:
        if not line.strip():
            if current is not None:
                break
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        match = re.match(r"^([\w, ]+):\s*(.*)$", line.strip()) if width == indent else None
        if match:
            names = [n.strip() for n in match.group(1).split(",") if n.strip()]
            current = names
            for n in names:
                # A description shared by several names says little about each one:
                # mark it so a per-key fallback can win.
                entries[n] = ("\0" if len(names) > 1 else "") + match.group(2)
        elif current is not None:
            for n in current:
                entries[n] += " " + line.strip()
    return entries


def parameter_docs(name: str) -> dict[str, str]:
    """Description of each keyword argument of method ``name``, from the Args
    sections of its class and base classes (the nearest class wins)."""
    from tta.methods import TTAMethod, method_class

    docs: dict[str, str] = dict(_FALLBACK_DOCS)
    for klass in reversed(method_class(name).__mro__):
        if isinstance(klass, type) and issubclass(klass, TTAMethod) and klass.__doc__:
            for key, text in _args_section(klass.__doc__).items():
                if text.startswith("\0"):
                    if key in _FALLBACK_DOCS:
                        continue
                    text = text[1:]
                docs[key] = _plain(text)
    return docs


def _plain(text: str) -> str:
    """Docstring markup to plain text for YAML comments."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"``([^`]+)``", r"\1", text)


def _summary(name: str) -> str:
    import tta.methods

    cls = tta.methods.method_class(name)
    module_doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
    class_doc = inspect.getdoc(cls) or ""
    first = module_doc.split("\n\n")[0] or class_doc.split("\n\n")[0]
    text = _plain(" ".join(first.split()))
    defaults = _plain(" ".join(class_doc.split("\n\n")[0].split())) if class_doc else ""
    return text + ("\n" + defaults if defaults and defaults not in text else "")


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")
        text = repr(value)
        if "e" in text:  # YAML 1.1 floats need a dot in the mantissa: 1.0e-05
            mantissa, exponent = text.split("e")
            text = f"{float(mantissa):.1f}e{exponent}" if "." not in mantissa else text
        return text
    if isinstance(value, str):
        return value if re.fullmatch(r"[A-Za-z_][\w.-]*", value) and value not in (
            "null", "true", "false", "yes", "no", "on", "off"
        ) else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to YAML")


def _comment(text: str, indent: str = "") -> str:
    return "\n".join(
        textwrap.wrap(text, width=88, initial_indent=indent + "# ", subsequent_indent=indent + "# ")
    )


PRESET_DOC = (
    "Published settings to start from (tta.method_presets; this method has: {presets}): auto "
    "takes the data set's (cifar10 for CIFAR-10-C, imagenet for ImageNet-C), none the defaults "
    "below. Values below that differ from the defaults override the preset's."
)


def render_method_yaml(name: str) -> str:
    """The text of ``conf/method/<name>.yaml``: every configurable keyword argument
    of the method with its default, each with a comment."""
    import tta

    docs = parameter_docs(name)
    parts = [_comment(line) for line in _summary(name).splitlines()]
    parts.append(_comment(
        f"Generated by `python -m tta.bench.methodconf --write` from tta.method_defaults({name!r}); "
        "a test checks that the values still match."
    ))
    parts.append(_comment("Registered method name (tta.list_methods())."))
    parts.append(f"name: {name}")
    parts.append(_comment(PRESET_DOC.format(presets=", ".join(sorted(tta.method_presets(name))))))
    parts.append("preset: auto")
    for key, value in configurable_defaults(name).items():
        doc = docs.get(key) or f"{key} (see the {name} docstring)."
        first_word = doc.split(" ", 1)[0]
        if not re.search(r"[._]", first_word):
            doc = doc[0].upper() + doc[1:]
        if not doc.endswith("."):
            doc += "."
        if value is None and key in _NULL_MEANS and "None" not in doc:
            doc += " " + _NULL_MEANS[key]
        parts.append(_comment(doc))
        parts.append(f"{key}: {_yaml_value(value)}")
    return "\n".join(parts) + "\n"


def check_method_configs(method_dir: str | Path | None = None) -> list[str]:
    """Differences between the method YAMLs and :func:`configurable_defaults`, one
    message per problem (empty when they agree)."""
    import tta
    from omegaconf import OmegaConf

    from .config import config_dir

    folder = Path(method_dir) if method_dir is not None else config_dir() / "method"
    problems = []
    for name in tta.list_methods():
        path = folder / f"{name}.yaml"
        if not path.is_file():
            problems.append(f"{path}: missing (method {name!r} is registered)")
            continue
        data = OmegaConf.to_container(OmegaConf.load(path))
        if data.get("name") != name:
            problems.append(f"{path}: name is {data.get('name')!r}, expected {name!r}")
        expected = configurable_defaults(name)
        if data.get("preset") != "auto":
            problems.append(f"{path}: preset is {data.get('preset')!r}, expected auto")
        got = {k: v for k, v in data.items() if k not in ("name", "preset")}
        for key in sorted(set(expected) | set(got)):
            if key not in got:
                problems.append(f"{path}: {key} missing (default {expected[key]!r})")
            elif key not in expected:
                problems.append(f"{path}: {key} is not a hyper-parameter of {name}")
            elif not _equal(got[key], expected[key]):
                problems.append(f"{path}: {key} is {got[key]!r}, tta.method_defaults says {expected[key]!r}")
    return problems


def _equal(a: Any, b: Any) -> bool:
    from .config import _same

    return _same(a, b)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--check`` (default) or ``--write`` the method YAMLs."""
    import tta

    from .config import config_dir

    parser = argparse.ArgumentParser(prog="python -m tta.bench.methodconf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="regenerate the YAML files")
    parser.add_argument("--dir", type=Path, default=None, help="folder of the method YAMLs")
    args = parser.parse_args(argv)
    folder = args.dir or config_dir() / "method"
    if args.write:
        folder.mkdir(parents=True, exist_ok=True)
        for name in tta.list_methods():
            (folder / f"{name}.yaml").write_text(render_method_yaml(name))
            print(f"wrote {folder / name}.yaml")
        return 0
    problems = check_method_configs(folder)
    for p in problems:
        print(p, file=sys.stderr)
    print("method configs match tta.method_defaults" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
