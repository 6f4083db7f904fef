"""Method configs (``conf/method/``) generated from the method registry.

The YAML files mirror :func:`tta.method_defaults` (the Python signatures are the
single source of truth) and take their comments from the methods' docstrings. The
options of the base class are written once, in ``conf/method/shared/``, one file per
kind of method that uses them (:data:`SHARED`); each ``conf/method/<name>.yaml``
includes the shared files its method uses and lists only its own options and the
shared ones whose defaults it changes::

    python -m tta.bench.methodconf --check    # exit 1 when a YAML drifted
    python -m tta.bench.methodconf --write    # regenerate conf/method/
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

__all__ = ["SHARED", "NOT_CONFIGURABLE", "configurable_defaults", "preset_values", "render_configs",
           "check_method_configs", "main"]

#: Keyword arguments that a YAML cannot or must not set, with the reason.
NOT_CONFIGURABLE: dict[str, dict[str, str]] = {
    # The runner builds this loader from data.source_root (method.fisher_size images).
    "*": {"fisher_loader": "built by tta-bench from data.source_root",
          "source_loader": "built by tta-bench from data.source_root",
          "transform": "a module (e.g. a kornia.augmentation pipeline), given in Python",
          "destroy": "a module (e.g. a kornia.augmentation pipeline), given in Python",
          "source_statistics": "tensors (mean, std), given in Python"},
    # ETA is EATA with fisher_alpha forced to 0 by ETA.__init__; method_defaults
    # still reports EATA's signature (fisher_alpha=2000), which would mislead here.
    "eta": {
        "fisher_alpha": "ETA is EATA without the Fisher regulariser",
        "fisher_size": "ETA is EATA without the Fisher regulariser",
    },
}

#: The shared files (``conf/method/shared/<file>.yaml``) and what each holds: the base
#: class's options of one kind. A method includes a file when it uses its options
#: (:meth:`TTAMethod.unused_options` names those it does not).
SHARED = {
    "common": "the options of every method",
    "optimizer": "the options of methods that take gradient steps",
    "norm_params": "the option of methods that adapt norm layers' affine parameters",
    "batch_stats": "the option of methods that use test-batch statistics",
}

PRESET_DOC = (
    "Published settings to start from (tta.method_presets; each method's file names its presets): auto "
    "takes the data set's (cifar10 for CIFAR-10-C, imagenet for ImageNet-C), none the defaults. The "
    "options a preset changes read ${preset_or:<default>}, so the composed config holds what runs; "
    "a value set on the command line or in a config file beats the preset's (method.optimizer=sgd "
    "beats a preset's adam)."
)


def _base_options() -> dict[str, dict[str, Any]]:
    """The base class's options with their defaults, by shared file."""
    from tta.methods import TTAMethod

    params = inspect.signature(TTAMethod.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    norm = ("skip_modules",)
    kinds = {"optimizer": [k for k in TTAMethod.optimizer_options if k not in norm],
             "norm_params": list(norm), "batch_stats": list(TTAMethod.batch_stats_options)}
    claimed = {k for keys in kinds.values() for k in keys}
    kinds["common"] = [k for k in defaults if k not in claimed]
    return {file: {k: _plain_value(defaults[k]) for k in kinds[file]} for file in SHARED}


def _plain_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value  # YAML has no tuples


def configurable_defaults(name: str) -> dict[str, Any]:
    """The keys and defaults a ``method`` config holds once composed:
    :func:`tta.method_defaults` minus :data:`NOT_CONFIGURABLE`, tuples as lists."""
    import tta

    skip = set(NOT_CONFIGURABLE["*"]) | set(NOT_CONFIGURABLE.get(name, {}))
    return {k: _plain_value(v) for k, v in tta.method_defaults(name).items() if k not in skip}


def shared_files(name: str) -> list[str]:
    """The shared files method ``name`` includes: those whose options it uses."""
    from tta.methods import method_class

    unused = method_class(name).unused_options()
    return [file for file, options in _base_options().items() if not set(options) & set(unused)]


def _args_section(doc: str) -> dict[str, str]:
    """``{name: description}`` from a Google-style ``Args:`` section (an entry may
    name several parameters: ``a, b: ...``)."""
    lines = inspect.cleandoc(doc).splitlines()
    if "Args:" not in (line.strip() for line in lines):
        return {}
    start = [line.strip() for line in lines].index("Args:")
    entries: dict[str, str] = {}
    current: list[str] = []
    indent = None
    for line in lines[start + 1:]:
        width = len(line) - len(line.lstrip())
        if not line.strip() or (indent is not None and width < indent):
            break
        indent = width if indent is None else indent
        match = re.match(r"^([\w, ]+):\s*(.*)$", line.strip()) if width == indent else None
        if match:
            current = [n.strip() for n in match.group(1).split(",") if n.strip()]
            entries.update(dict.fromkeys(current, match.group(2)))
        else:
            entries.update({n: entries[n] + " " + line.strip() for n in current})
    return entries


def _docs(cls: type) -> dict[str, str]:
    """Description of each option of method class ``cls`` from the Args sections of
    it and its base classes (the nearest class wins), with what ``None`` stands for
    in the papers' margins (:attr:`TTAMethod.margin_fractions`)."""
    from tta.methods import TTAMethod

    docs: dict[str, str] = {}
    for klass in [k for k in reversed(cls.__mro__) if issubclass(k, TTAMethod)]:
        docs.update({k: _plain(v) for k, v in _args_section(klass.__dict__.get("__doc__") or "").items()})
    for option, fraction in getattr(cls, "margin_fractions", {}).items():
        docs[option] = docs.get(option, option).rstrip(".") + f". null: {fraction} * ln(num_classes)"
    return docs


def _plain(text: str) -> str:
    """Docstring markup to plain text for YAML comments."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"``([^`]+)``", r"\1", text)


def _comment(text: str) -> str:
    return "\n".join(textwrap.wrap(text, width=88, initial_indent="# ", subsequent_indent="# "))


def _entry(key: str, value: Any, doc: str | None, presets: dict[str, Any] | None = None) -> str:
    """``key: value`` under its comment; with ``presets`` (``{preset: its value}``)
    the value is ``${preset_or:<value>}``, the preset's value when one applies."""
    doc = doc or f"{key} (see the method's docstring)"
    doc = (doc if re.search(r"[._]", doc.split(" ", 1)[0]) else doc[0].upper() + doc[1:]).rstrip(".") + "."
    text = _flow(value)
    if presets:
        doc += f" Default {text}; the preset's where it sets one ({'; '.join(f'{p}: {_flow(v)}' for p, v in presets.items())})."
        text = f"${{preset_or:{text}}}"
    return f"{_comment(doc)}\n{key}: {text}"


def _flow(value: Any) -> str:
    return yaml.safe_dump(_plain_value(value), default_flow_style=True, width=10**6).removesuffix("...\n").strip()


def preset_values(name: str) -> dict[str, dict[str, Any]]:
    """``{option: {preset: value}}`` of the options the presets of method ``name``
    change (their config values are ``${preset_or:<default>}``)."""
    import tta

    out: dict[str, dict[str, Any]] = {}
    for preset, values in sorted(tta.method_presets(name).items()):
        for key, value in values.items():
            out.setdefault(key, {})[preset] = value
    return out


def _summary(cls: type) -> list[str]:
    """The module docstring's first paragraph and the class docstring's."""
    module_doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
    class_doc = inspect.getdoc(cls) or ""
    first = _plain(" ".join(module_doc.split("\n\n")[0].split()))
    defaults = _plain(" ".join(class_doc.split("\n\n")[0].split()))
    return [first] + ([defaults] if defaults and defaults not in first else [])


def render_configs() -> dict[str, str]:
    """The text of every generated file, by path relative to ``conf/method``."""
    import tta
    from tta.methods import TTAMethod, method_class

    base, base_docs = _base_options(), _docs(TTAMethod)
    generated = "Generated by `python -m tta.bench.methodconf --write`; a test checks it is current."
    files = {}
    for file, options in base.items():
        parts = [_comment(f"Shared by the method configs: {SHARED[file]} (tta.TTAMethod's defaults)."),
                 _comment(generated)]
        if file == "common":
            parts.append(_comment(PRESET_DOC) + "\npreset: auto")
        parts += [_entry(k, v, base_docs.get(k)) for k, v in options.items()]
        files[f"shared/{file}.yaml"] = "\n".join(parts) + "\n"
    for name in tta.list_methods():
        cls, own = method_class(name), configurable_defaults(name)
        included = shared_files(name)
        inherited = {k: v for file in included for k, v in base[file].items()}
        docs = _docs(cls)
        parts = [_comment(line) for line in _summary(cls)]
        parts.append(_comment(f"{generated} Options not listed here are the shared defaults of "
                              f"conf/method/shared/ ({', '.join(included)})."))
        parts.append("defaults:\n" + "".join(f"  - shared/{f}@_here_\n" for f in included) + "  - _self_")
        parts.append(_comment("Registered method name (tta.list_methods()).") + f"\nname: {name}")
        parts.append(_comment(f"Presets of {name}: {', '.join(sorted(tta.method_presets(name)))}."))
        if "common" not in included:  # a method without some common option still takes a preset
            parts.append(_comment(PRESET_DOC) + "\npreset: auto")
        changed = preset_values(name)
        parts += [_entry(k, v, docs.get(k), changed.get(k)) for k, v in own.items()
                  if k in changed or k not in inherited or inherited[k] != v]
        files[f"{name}.yaml"] = "\n".join(parts) + "\n"
    return files


def check_method_configs(method_dir: str | Path | None = None) -> list[str]:
    """One message per generated file that is missing or differs from what
    ``--write`` would write (empty when all are current)."""
    from .config import config_dir

    folder = Path(method_dir) if method_dir is not None else config_dir() / "method"
    problems = []
    for rel, text in render_configs().items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.read_text() != text:
            ours, theirs = text.splitlines(), path.read_text().splitlines()
            line = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            problems.append(f"{path}:{line + 1}: differs from tta.method_defaults "
                            f"(expected {ours[line] if line < len(ours) else 'end of file'!r})")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--check`` (default) or ``--write`` the method YAMLs."""
    from .config import config_dir

    parser = argparse.ArgumentParser(prog="python -m tta.bench.methodconf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="report files that drifted (the default)")
    mode.add_argument("--write", action="store_true", help="regenerate the YAML files")
    parser.add_argument("--dir", type=Path, default=None, help="folder of the method YAMLs")
    args = parser.parse_args(argv)
    folder = args.dir or config_dir() / "method"
    if args.write:
        for rel, text in render_configs().items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)
            print(f"wrote {folder / rel}")
        return 0
    problems = check_method_configs(folder)
    for p in problems:
        print(p, file=sys.stderr)
    print("method configs match tta.method_defaults (--write regenerates them)" if not problems
          else f"{len(problems)} problem(s): python -m tta.bench.methodconf --write regenerates them")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
