"""benchmarks/gpu_check.py, the one prepared device check: its CPU run at tiny sizes
writes every section, a section past its time or failing is recorded and the run
goes on, and the GPU plan is made of registered methods, known models and a
tta-bench config that reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tta
from benchmarks import gpu_check
from benchmarks.gpu_check_report import render_markdown

ROOT = Path(__file__).resolve().parents[1]
CIFAR_TEST = tta.tta_home() / "data" / "cifar10" / "test"
needs_cifar = pytest.mark.skipif(
    not CIFAR_TEST.is_dir() or not (tta.tta_home() / "models" / "cifar10").is_dir(),
    reason="needs $TTA_HOME/data/cifar10 and $TTA_HOME/models/cifar10",
)


@needs_cifar
@pytest.mark.slow
def test_quick_cpu_run_writes_every_section(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, TTA_HOME=str(tta.tta_home()), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out), "--device", "cpu",
                           "--quick", "--work", str(work)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    assert not list(work.iterdir())  # the images and runs went with the temporary folder
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(gpu_check.SECTIONS, "ok")
    plan = gpu_check._quick_plan()

    tests = sections["cuda_tests"]["result"]
    assert tests["counts"]["skipped"] >= 19 and "failed" not in tests["counts"]  # no GPU here: all skip
    assert "tests/test_cuda.py" in tests["files"]

    rows = sections["corruptions"]["result"]["rows"]
    assert [r["name"] for r in rows] == list(plan.corruptions)
    assert all(r["ms_per_image"] > 0 and r["ms_per_image_uint8"] > 0 and r["ms_per_image_per_image_generators"] > 0
               for r in rows)

    for name, groups in (("speed", plan.speed), ("compile", plan.compile)):
        done = sections[name]["result"]["groups"]
        assert [(g["model"], g["setting"]) for g in done] == [(g.model, g.setting) for g in groups]
        for g, planned in zip(done, groups):
            assert not g["errors"] and list(g["rows"]) == ["plain", *planned.methods]
            assert g["rows"]["plain"]["ratio"] == 1.0 and all(r["images_per_s"] > 0 for r in g["rows"].values())

    data = sections["data_path"]["result"]
    assert [r["stream"]["loader"] for r in data["rows"]] == ["dataloader", "tensor_cache"]
    for r in data["rows"]:
        assert r["run"]["num_images"] == 16 and r["run"]["images_per_s"] > 0 and r["run"]["wait_s"] > 0
        assert r["stream"]["load_render"]["images"] == 16 and r["run"]["mean_error"] < 100
    assert data["decode"]["pil_images_per_s"] > 0 and data["decode"]["torchvision_images_per_s"] > 0

    md = (out / "gpu_check.md").read_text()
    for title in ("## CUDA tests", "## Corruptions on the device", "## Speed: each method", "## tta-bench data path",
                  "## Speed with torch.compile", "| plain `model(x)` |", "| imagenetc, 1 worker |"):
        assert title in md


def _child(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(f"import json, sys, time\nfragment = {str(tmp_path / 'frag.json')!r}\n{body}\n")
    return [sys.executable, str(script)]


def test_a_section_past_its_time_is_killed_and_keeps_what_it_saved(tmp_path):
    frag, log = tmp_path / "frag.json", tmp_path / "log"
    cmd = _child(tmp_path, "open(fragment, 'w').write(json.dumps({'rows': [1]}))\nprint('started', flush=True)\n"
                           "time.sleep(120)")
    entry = gpu_check.run_section(cmd, frag, budget_s=1, timeout_s=3, log=log)
    assert entry["status"] == "timed out" and entry["result"] == {"rows": [1]}
    assert entry["seconds"] < 60 and "killed after 3 s" in entry["error"] and "started" in entry["log_tail"]


def test_a_failing_section_is_recorded_with_its_error(tmp_path):
    frag, log = tmp_path / "frag.json", tmp_path / "log"
    cmd = _child(tmp_path, "open(fragment, 'w').write(json.dumps({'rows': [1]}))\n"
                           "raise RuntimeError('CUDA out of memory')")
    entry = gpu_check.run_section(cmd, frag, budget_s=10, timeout_s=60, log=log)
    assert entry["status"] == "failed" and entry["error"] == "RuntimeError: CUDA out of memory"
    assert entry["result"] == {"rows": [1]}
    frag.unlink()
    cmd = _child(tmp_path, "open(fragment, 'w').write(json.dumps({'not_run': ['vit fp32']}))")
    assert gpu_check.run_section(cmd, frag, budget_s=10, timeout_s=60, log=log)["status"] == "partial"


def test_the_gpu_plan_runs_registered_methods_on_known_models_within_8_minutes(tmp_path):
    import timm

    from tta.bench import compose_config, read_config

    plan = gpu_check._full_plan()
    assert set(plan.budgets) == set(gpu_check.SECTIONS)
    # The parent hands out at most total_s; a killed section may overrun by the grace.
    assert plan.total_s + plan.grace_s <= 8 * 60
    known = set(tta.list_methods())
    models = set(tta.list_models("zoo:*")) | set(tta.list_models("cifar10*"))
    for g in plan.speed + plan.compile:
        assert set(g.methods) <= known, g
        assert timm.is_model(g.model.removeprefix("timm:")) if g.model.startswith("timm:") else g.model in models
    from benchmarks.speed import METHODS

    assert {m for g in plan.speed for m in g.methods} == set(METHODS)
    d = plan.data
    read_config(compose_config([f"model={d.model}", *d.overrides, "method=tent", "data=imagenetc",
                                f"data.root={tmp_path}", f"data.corruptions=[{','.join(d.corruptions)}]",
                                f"data.num_images={d.num_images}", "run.device=cuda"]))
    assert d.per_class * 10 >= d.num_images


def test_the_report_of_a_run_cut_short_renders():
    report = dict(meta=dict(mode="full", date="2026-12-06", commit="abc", device="cuda", cpu="x", cores=16,
                            command="python -m benchmarks.gpu_check --out o", total_budget_s=450, seconds=451),
                  sections={name: dict(status="not run", error="the total budget was spent", result={})
                            for name in gpu_check.SECTIONS})
    md = render_markdown(report)
    assert md.count("| not run |") == len(gpu_check.SECTIONS) and "## Speed with torch.compile" in md
