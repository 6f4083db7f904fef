"""The Markdown of a :mod:`benchmarks.gpu_check` report: the run's header, the status
of each section, and each section's tables with issue 27's targets marked, ready
to paste into RESULTS.md."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.data_path import markdown as data_path_table
from benchmarks.speed import rate

#: Issue 27's speed targets: a multiple of plain inference, ResNet-50 at batch 64 in bf16.
SPEED_TARGETS = {"norm": 1.2, "tent": 2.6, "deyo": 3.8, "sar": 4.8}
TARGET_MODEL = "timm:resnet50"
#: Corruption rendering on the GPU against the original code, per image (the 15 summed).
CORRUPTION_TARGET = 1000.0


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so that a reader (or a
    run killed mid-write) never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def _header(report: dict) -> list[str]:
    meta = report["meta"]
    env = next((s["result"]["env"] for s in report["sections"].values() if s.get("result", {}).get("env")), {})
    device = env.get("device_name", meta["device"])
    if env.get("device_memory_gib"):
        device += f" ({env['device_memory_gib']} GiB)"
    return [
        f"# tta device check ({meta['mode']})",
        "",
        f"- date: {meta['date']}; commit {meta['commit']}",
        f"- device: `{meta['device']}`: {device}; torch {env.get('torch', '?')}, CUDA {env.get('cuda')}; "
        f"host CPU {meta['cpu']} ({meta['cores']} cores)",
        f"- command: `TTA_HOME=<shared folder> {meta['command']}`",
        f"- wall time: {meta.get('seconds', 0):.0f} s (budget {meta['total_budget_s']:.0f} s)",
        "",
        "| section | status | seconds (budget) | note |",
        "|---|---|---:|---|",
    ] + [
        f"| {name} | {s['status']} | {s.get('seconds', 0):.0f} ({s.get('budget_s', 0):.0f}) | "
        f"{s.get('error') or ('not run: ' + '; '.join(s['result']['not_run']) if s['result'].get('not_run') else '')} |"
        for name, s in report["sections"].items()
    ]


def _cuda_tests(r: dict) -> list[str]:
    counts = ", ".join(f"{n} {k}" for k, n in r.get("counts", {}).items()) or "no summary line"
    lines = [f"`{r.get('command', 'pytest -m cuda')}`: {counts}."]
    if r.get("failed"):
        lines += ["", "```", *r["failed"], "```"]
    return lines


def _speed(r: dict) -> list[str]:
    lines: list[str] = []
    for g in r.get("groups", []):
        targets = g["model"] == TARGET_MODEL and "bf16" in g["setting"]
        options = ", ".join(f"{k}={v}" for k, v in g["options"].items()) or "defaults"
        lines += ["", f"### {g['model']}, batch {g['batch']}, {g['setting']} ({options}; "
                      f"median of {g['repeats']} interleaved repeats)", "",
                  "| method | img/s | × plain inference | peak step memory MB |" + (" target |" if targets else ""),
                  "|---|---:|---:|---:|" + ("---|" if targets else "")]
        for name, row in g["rows"].items():
            cell = ""
            if targets:
                limit = SPEED_TARGETS.get(name)
                cell = f" ≤ {limit} {_mark(row['ratio'] <= limit)} |" if limit else " |"
            label = "plain `model(x)`" if name == "plain" else name
            lines.append(f"| {label} | {rate(row['images_per_s'])} | {row['ratio']:.2f} | {row['peak_mb']:.0f} |{cell}")
        for name, error in g["errors"].items():
            lines.append(f"| {name} | {error} | | |" + (" |" if targets else ""))
    return lines


def _corruptions(r: dict) -> list[str]:
    lines = [f"{r.get('size')} px, batch {r.get('batch')}, severity 5, median of {r.get('repeats')} repeats; "
             "ms per image = batch time / batch size.", "",
             "| corruption | ms/image, float, one generator | ms/image, uint8, one generator "
             "| ms/image, uint8, a generator per image (tta-bench) |",
             "|---|---:|---:|---:|"]
    lines += [f"| {row['name']} | {row['ms_per_image']:.3f} | {row.get('ms_per_image_uint8', float('nan')):.3f} "
              f"| {row['ms_per_image_per_image_generators']:.3f} |" for row in r.get("rows", [])]
    f = r.get("fifteen")
    if f:
        lines += ["", f"The 15 summed: {f['ms_per_image']:.3f} ms per image on float images (uint8: "
                      f"{f.get('ms_per_image_uint8', float('nan')):.3f} ms; uint8 with a generator per image: "
                      f"{f['ms_per_image_per_image_generators']:.3f} ms) against the original code's "
                      f"{f['original_ms_per_image']:.0f} ms on one CPU thread: **{f['speedup']:.0f}×** "
                      f"({f['speedup_per_image_generators']:.0f}×); target ≥ {CORRUPTION_TARGET:.0f}× "
                      f"{_mark(f['speedup'] >= CORRUPTION_TARGET)}"]
    return lines


def _data_path(r: dict) -> list[str]:
    lines = [f"Images written in {r.get('build_s', 0):.1f} s. Stream img/s after its first batch (load alone / "
             "with rendering and resize); method img/s: the method calls alone (results.json images_per_s); "
             "the loop's waits for its batches, timed inside the run, against the loader's seconds alone.", ""]
    if r.get("rows"):
        lines += data_path_table(r["rows"])
    d = r.get("decode")
    if d:
        lines += ["", f"JPEG decoding of {d['images']} of the tree's files: Pillow {d['pil_images_per_s']:.0f} img/s "
                      f"in one process (each DataLoader worker), torchvision `decode_jpeg` on `{d['device']}` "
                      f"{d['torchvision_images_per_s']:.0f} img/s in batches of 64."]
    return lines


RENDERERS = {"cuda_tests": ("CUDA tests", _cuda_tests), "corruptions": ("Corruptions on the device", _corruptions),
             "speed": ("Speed: each method as a multiple of plain inference", _speed),
             "data_path": ("tta-bench data path", _data_path), "compile": ("Speed with torch.compile", _speed)}


def render_markdown(report: dict) -> str:
    """The whole report as Markdown (sections that saved nothing show their status only)."""
    lines = _header(report)
    for name, section in report["sections"].items():
        title, render = RENDERERS[name]
        lines += ["", f"## {title}", ""]
        if section.get("log_tail") and section["status"] != "ok":
            lines += [f"{section['status']}: {section.get('error')}", ""]
        if set(section.get("result") or {}) - {"env"}:
            lines += render(section["result"])
    return "\n".join(lines) + "\n"
