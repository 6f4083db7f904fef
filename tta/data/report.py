"""What a check of CIFAR-10-C or ImageNet-C asks for, and what it found.

- The corruptions and severities to check: the 15 benchmark corruptions of
  :mod:`tta.corruptions` required and the 4 held-out ones optional by default
  (:func:`_wanted_corruptions`), severities 1-5 (:func:`_check_severities`).
- :class:`DataReport`: what :func:`~tta.data.cifar10c.check_cifar10c_folder` and
  :func:`~tta.data.imagenetc.check_imagenetc_folder` found, its summary and the
  ``tta-bench`` command line that reads the folder.
- :class:`DataNotFoundError`: the data set is not on this machine.
"""

from __future__ import annotations

import difflib
import numbers
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, TypeVar

from ._files import _home_or_none

SEVERITIES = (1, 2, 3, 4, 5)

T = TypeVar("T")


#: Paths that both the shell and Hydra's override grammar read as they are.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9_/.+@%:-]*")


def bench_arg(key: str, value: str | os.PathLike) -> str:
    """``key=value`` as one word of a shell command line that Hydra's override
    parser reads back as ``value`` (the ``tta-bench`` lines tta-data prints are
    meant to be copied into a shell). A path of plain characters stays as it is;
    any other value (a space, a comma: Hydra's list separator, quotes, ``=``, ...)
    goes into Hydra's double quotes, where ``"`` and the backslashes before it or
    at the end are escaped, and ``${`` too (OmegaConf would resolve it); the whole
    word then into shell quotes."""
    text = os.fspath(value)
    if _PLAIN_PATH.fullmatch(text):
        return f"{key}={text}"
    hydra = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', text)
    hydra = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, hydra).replace("${", "\\${")
    return shlex.quote(f'{key}="{hydra}"')


def _corruption_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the 15 benchmark corruptions, the 4 held-out extras) of tta.corruptions."""
    from ..corruptions import EXTRA_NAMES, NAMES

    return tuple(NAMES), tuple(EXTRA_NAMES)


def _wanted_corruptions(corruptions: str | Sequence[str] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) corruption names: by default the 15 benchmark ones are
    required and the 4 extras optional; given names (one name as a string, or
    ``all``) are all required."""
    benchmark, extra = _corruption_names()
    if corruptions is None:
        return benchmark, extra
    # a string is one name (iterated, "fog" would be the names f, o, g)
    names = [corruptions] if isinstance(corruptions, str) else _as_list(
        corruptions, f"corruptions={corruptions!r}: give a corruption name, a sequence of names, or 'all'")
    for n in names:
        if not isinstance(n, str):
            raise ValueError(f"corruption {n!r} is not a name: give names such as fog, or all")
    if [n.lower() for n in names] == ["all"]:
        return benchmark + extra, ()
    return unique_choices((_corruption_key(n, benchmark + extra) for n in names), "no corruption asked for"), ()


def _corruption_key(name: str, known: tuple[str, ...]) -> str:
    key = name.strip().lower().replace("-", "_")
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown corruption {name!r}{hint} (choose from {', '.join(known)}, or all)")
    return key


def _as_list(values: object, refusal: str) -> list:
    """``values`` (an iterable other than a string) as a list; ``ValueError(refusal)`` otherwise."""
    if isinstance(values, (str, bytes)):
        raise ValueError(refusal)
    try:
        return list(values)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(refusal) from None


def _check_severities(severities: int | Sequence[int] | None) -> tuple[int, ...]:
    """The severities asked for (default all of 1..5): an int or a sequence of ints
    1..5, sorted, each once. Anything else is refused, not converted (``int()``
    would truncate 5.9 to 5, take True for 1, and a string "15" iterates as 1, 5)."""
    if severities is None:
        return SEVERITIES
    if _is_int(severities):
        severities = [severities]  # type: ignore[list-item]
    values = _as_list(severities, f"severities={severities!r}: give a severity 1..5 or a sequence of them "
                                  "(from the command line: --severities 1,5)")
    return tuple(sorted(unique_choices((_severity(s) for s in values), "no severity asked for: choose from 1..5")))


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _severity(s: object) -> int:
    if not _is_int(s):
        raise ValueError(f"severity {s!r} is not an integer: choose from 1..5")
    value = int(s)  # type: ignore[call-overload]
    if value not in SEVERITIES:
        raise ValueError(f"severity {value} is out of range: choose from 1..5")
    return value


def severities_from_text(texts: Sequence[str]) -> list[int]:
    """The command line's ``--severities`` words as ints (whole numbers only)."""
    out = []
    for text in texts:
        try:
            out.append(int(text, 10))
        except ValueError:
            raise ValueError(f"severity {text!r} is not an integer: choose from 1..5") from None
    return out


def unique_choices(values: Iterable[T], nothing: str) -> tuple[T, ...]:
    """``values`` (each checked as the iterable yields it) in order, each once;
    ``ValueError(nothing)`` when there are none."""
    out = tuple(dict.fromkeys(values))
    if not out:
        raise ValueError(nothing)
    return out


class DataNotFoundError(FileNotFoundError):
    """The data set is not on this machine; the message says where to get it."""


@dataclass
class DataReport:
    """What a layout check found.

    ``missing``: required entries that are absent; ``bad``: entries present but
    unusable, with the reason; ``optional_missing``: absent entries the benchmark
    does not need by default (the 4 held-out corruptions). ``counts``: images per
    entry. ``usable``: nothing missing and nothing bad.
    """

    dataset: str
    root: Path
    present: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)
    optional_missing: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    corruptions: tuple[str, ...] = ()
    severities: tuple[int, ...] = SEVERITIES

    @property
    def usable(self) -> bool:
        return not self.missing and not self.bad

    def summary(self) -> str:
        lines = [f"{self.dataset} at {self.root}:"]
        lines.append(f"  present: {len(self.present)}: {', '.join(self.present) or 'nothing'}")
        if self.counts:
            sizes = sorted(set(self.counts.values()))
            if len(sizes) == 1:
                lines.append(f"  images: {sizes[0]} in each of the {len(self.counts)} checked")
            else:
                lines.append("  images: " + ", ".join(f"{k} {v}" for k, v in self.counts.items()))
        if self.missing:
            lines.append(f"  missing: {len(self.missing)}: {', '.join(self.missing)}")
        if self.bad:
            lines.append(f"  bad: {len(self.bad)}")
            lines += [f"    {name}: {why}" for name, why in self.bad.items()]
        if self.optional_missing:
            lines.append(
                f"  not present (optional, the held-out corruptions): {', '.join(self.optional_missing)}"
            )
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  usable: yes" if self.usable else "  usable: NO")
        return "\n".join(lines)

    def next_step(self) -> str:
        data = "cifar10c_disk" if self.dataset == "CIFAR-10-C" else "imagenetc"
        benchmark, _ = _corruption_names()
        extra = ""
        if tuple(self.corruptions) != benchmark:
            extra += f" 'data.corruptions=[{','.join(self.corruptions)}]'"
        if len(self.severities) == 1:
            extra += f" data.severity={self.severities[0]}"
        line = f"tta-bench data={data} {bench_arg('data.root', self.root)}{extra}"
        home = _home_or_none()
        if data == "cifar10c_disk" and (home is None or not (home / "data" / "cifar10" / "train").is_dir()):
            line += ("\n  (EATA's Fisher regulariser also reads clean training images, data.source_root: "
                     "`tta-data cifar10 --split train` writes them)")
        return line


def _short_problems(report: DataReport) -> str:
    """What makes ``report`` unusable, in one line (the first few entries)."""
    parts = []
    if report.missing:
        parts.append(f"missing {', '.join(report.missing[:5])}{' ...' if len(report.missing) > 5 else ''}")
    if report.bad:
        parts.append("bad " + "; ".join(f"{k}: {v}" for k, v in list(report.bad.items())[:3]))
    return ", ".join(parts) or "see tta-data for a summary"
