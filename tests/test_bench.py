"""tta.bench: configs, data sources, scenarios, the Hydra app, resume and report.

Everything runs offline on the shared CIFAR-10 images and ResNet-20 weights, with
a few batches per run so the file stays well under two minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
from dataclasses import replace
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from PIL import Image

import tta
from tta.bench import compose_config, config_dir, config_hash, make_report, run_benchmark
from tta.bench.config import NON_RESULT_KEYS
from tta.bench.methodconf import check_method_configs
from tta.bench.settings import read_config
from tta.bench.sources import build_domains
from tta.bench.stream import build_stream, dirichlet_order
from tta.data import cifar10_dir, imagenet_wnids, load_image_folder

REPO = Path(__file__).resolve().parents[1]
# Small, quick runs: 2 domains, 32 images each, no plot/progress unless a test wants them.
QUICK = [
    "data.corruptions=[gaussian_noise,contrast]",
    "data.num_images=32",
    "run.batch_size=16",
    "run.device=cpu",
    "run.progress=false",
    # One thread: 2-thread OpenMP crawls when the other core is busy (shared CI boxes).
    "run.num_threads=1",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TTA_HOME", str(REPO.parent / "shared"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _bench(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tta.bench", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------


def test_method_yamls_agree_with_method_defaults() -> None:
    assert check_method_configs() == []
    method_dir = config_dir() / "method"
    assert sorted(p.stem for p in method_dir.glob("*.yaml")) == sorted(tta.list_methods())
    for name in tta.list_methods():
        # Each file, composed with the shared files it includes, holds the method's
        # defaults, and lists itself only what is its own or differs from them.
        cfg = OmegaConf.to_container(compose_config([f"method={name}", "method.preset=none"]).method, resolve=True)
        assert cfg.pop("name") == name
        assert cfg.pop("preset") == "none"  # the presets' values: test_bench_cli's round trip
        defaults = tta.method_defaults(name)
        for key, value in cfg.items():
            assert key in defaults, f"{name}.yaml has {key}, which {name} does not take"
            expected = defaults[key]
            expected = list(expected) if isinstance(expected, tuple) else expected
            assert value == expected, f"{name}.yaml {key}={value!r}, method_defaults says {expected!r}"
        own = yaml.safe_load((method_dir / f"{name}.yaml").read_text())
        shared = {k: v for f in own["defaults"] if f != "_self_"
                  for k, v in yaml.safe_load((method_dir / f.split("@")[0].lstrip("/")).with_suffix(".yaml")
                                             .read_text()).items()}
        repeated = [k for k, v in own.items() if k in shared and shared[k] == v]
        assert not repeated, f"{name}.yaml repeats the shared {repeated}"


def test_groups_and_documented_keys() -> None:
    root = config_dir()
    groups = {g: sorted(p.stem for p in (root / g).glob("*.yaml")) for g in ("model", "data", "scenario")}
    assert {"cifar10_resnet20", "resnet50", "vit_base_patch16_224"} <= set(groups["model"])
    assert groups["data"] == ["cifar10c", "cifar10c_disk", "imagefolder_c", "imagenetc"]
    assert set(groups["scenario"]) == {"continual", "reset_each_shift", "mixed_domains", "gradual",
                                       "label_shift", "batch_size_1"}
    for launcher in (root / "hydra" / "launcher").glob("*.yaml"):
        assert yaml.safe_load(launcher.read_text())["defaults"]
    # Every file opens with a comment, and every top-level "key: value" line has a
    # comment within the three lines above it (closely related keys share one).
    for path in root.rglob("*.yaml"):
        lines = path.read_text().splitlines()
        assert lines[0].startswith("#"), f"{path} has no header comment"
        for i, line in enumerate(lines):
            is_leaf_key = line[:1].isalpha() and not line.rstrip().endswith(":")
            if is_leaf_key:
                block = lines[max(0, i - 3): i]
                assert any(b.lstrip().startswith("#") for b in block), f"{path}:{i + 1} {line!r} undocumented"


def test_non_result_keys_match_override_dirname_excludes() -> None:
    bench = yaml.safe_load((config_dir() / "bench.yaml").read_text())
    assert tuple(bench["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]) == NON_RESULT_KEYS


def test_compose_and_hash() -> None:
    cfg = compose_config(["method=tent", "method.lr=0.01", "scenario=batch_size_1"])
    assert cfg.method.name == "tent" and cfg.method.lr == 0.01
    assert cfg.run.batch_size == 1  # the scenario sets a global key
    same = compose_config(["method=tent", "method.lr=0.01", "scenario=batch_size_1", "run.progress=false"])
    other = compose_config(["method=tent", "method.lr=0.02", "scenario=batch_size_1"])
    assert config_hash(cfg) == config_hash(same) != config_hash(other)


# ----------------------------------------------------------------------------------
# Data sources
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def few_images() -> tuple[torch.Tensor, torch.Tensor]:
    return load_image_folder(cifar10_dir("test"), num_images=24, seed=3)


def _corrupt(x: torch.Tensor, name: str, severity: int) -> torch.Tensor:
    try:
        from tta.corruptions import corrupt
    except ImportError:  # another engineer's module; the tree only needs some distortion
        g = torch.Generator().manual_seed(severity)
        return (x + 0.05 * severity * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return corrupt(x, name, severity, generator=torch.Generator().manual_seed(0))


def test_imagenet_c_tree(tmp_path: Path, few_images) -> None:
    x, y = few_images
    wnids = imagenet_wnids()
    # Ten classes (so a CIFAR model can run on it), not contiguous: labels must be wnid indices.
    picks = (0, 7, 100, 200, 300, 400, 512, 600, 800, 999)
    chosen = [wnids[i] for i in picks]
    big = F.interpolate(x[:20], size=64, mode="bilinear", align_corners=False)
    for corruption in ("gaussian_noise", "contrast"):
        imgs = _corrupt(big, corruption, 5)
        for i, img in enumerate(imgs):
            folder = tmp_path / corruption / "5" / chosen[i % 10]
            folder.mkdir(parents=True, exist_ok=True)
            arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(arr).save(folder / f"ILSVRC2012_val_{i:08d}.JPEG", quality=90)

    tree = read_config(compose_config(["data=imagenetc", f"data.root={tmp_path}", "data.num_images=null",
                                       "data.corruptions=[gaussian_noise,contrast]", "data.image_size=48"]))
    domains, num_classes = build_domains(tree.data, tree.scenario)
    assert num_classes == 1000 and [d.name for d in domains] == ["gaussian_noise", "contrast"]
    for d in domains:
        assert len(d) == 20 and sorted(set(d.labels.tolist())) == list(picks)
        img = d.pool.read(int(d.rows[0]))
        assert img.dtype == torch.uint8 and img.shape == (3, 48, 48)

    # End to end through the runner: a 10-class model, folders numbered in sorted order.
    cfg = compose_config(["data=imagenetc", f"data.root={tmp_path}", "data.class_index=folder",
                          "data.image_size=32", "data.num_images=null", "data.corruptions=[gaussian_noise,contrast]",
                          "method=norm", "run.batch_size=8", "run.device=cpu", "run.progress=false", "run.num_threads=1",
                          "run.plot=false"])
    res = run_benchmark(cfg, tmp_path / "out")
    assert set(res["error"]) == {"gaussian_noise", "contrast"} and res["num_images"] == 40

    with pytest.raises(FileNotFoundError, match=r"<corruption>/<severity>/<wnid>"):
        build_domains(replace(tree.data, corruptions=("fog",)), tree.scenario)


def test_cifar10c_disk_npy(tmp_path: Path, few_images) -> None:
    x, y = few_images
    n = 16
    base = (x[:n].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for corruption in ("gaussian_noise", "fog"):
        # Severity s is marked in the first pixel so the test can tell the blocks apart.
        stack = np.concatenate([base.copy() for _ in range(5)])
        for s in range(5):
            stack[s * n: (s + 1) * n, 0, 0, 0] = s + 1
        np.save(tmp_path / f"{corruption}.npy", stack)
    np.save(tmp_path / "labels.npy", np.tile(y[:n].numpy().astype(np.int64), 5))

    disk = read_config(compose_config(["data=cifar10c_disk", f"data.root={tmp_path}", "data.severity=3",
                                       "data.corruptions=[gaussian_noise,fog]", "data.num_images=8"]))
    domains, _ = build_domains(disk.data, disk.scenario)
    assert [d.name for d in domains] == ["gaussian_noise", "fog"]
    for d in domains:
        assert len(d) == 8 and all(d.pool.read(int(r))[0, 0, 0].item() == 3 for r in d.rows)
        np.testing.assert_array_equal(d.labels, y[:n].numpy()[d.rows - 2 * n])
    gradual, _ = build_domains(disk.data, replace(disk.scenario, severities=(1, 5)))
    assert [d.name for d in gradual] == ["gaussian_noise/1", "gaussian_noise/5", "fog/1", "fog/5"]

    cfg = compose_config(["data=cifar10c_disk", f"data.root={tmp_path}", "data.corruptions=[gaussian_noise,fog]",
                          "data.num_images=16", "method=tent", "run.batch_size=8", "run.device=cpu", "run.num_threads=1",
                          "run.progress=false", "run.plot=false"])
    res = run_benchmark(cfg, tmp_path / "out")
    assert res["num_images"] == 32 and res["steps"]["num_selected"][0] == 8

    with pytest.raises(FileNotFoundError, match="labels.npy"):
        build_domains(replace(disk.data, root=str(tmp_path / "missing")), disk.scenario)


def test_a_last_batch_of_one_image_joins_the_one_before() -> None:
    from tta.bench.stream import cut_batches

    assert cut_batches(201, 100) == [(0, 100), (100, 201)]
    assert cut_batches(202, 100) == [(0, 100), (100, 200), (200, 202)]
    assert cut_batches(1, 100) == [(0, 1)]
    assert cut_batches(3, 1) == [(0, 1), (1, 2), (2, 3)]  # batches of one were asked for
    assert cut_batches(0, 4) == []


def test_dirichlet_label_shift_order() -> None:
    labels = np.repeat(np.arange(10), 50)
    rng = np.random.default_rng(0)
    order = dirichlet_order(labels, 0.1, 10, rng)
    assert sorted(order.tolist()) == list(range(500))
    # Strong label shift: consecutive images mostly share a class (i.i.d. gives ~10%).
    same = np.mean(labels[order][1:] == labels[order][:-1])
    assert same > 0.3
    iid = dirichlet_order(labels, 1e4, 10, np.random.default_rng(0))
    assert np.mean(labels[iid][1:] == labels[iid][:-1]) < 0.2


# ----------------------------------------------------------------------------------
# Scenarios end to end (compose API)
# ----------------------------------------------------------------------------------


def test_each_compiled_job_starts_from_empty_dynamo_caches(tmp_path: Path, monkeypatch) -> None:
    """A sweep's jobs share a process; dynamo's caches (per code object) would fill
    to its recompile limit over the jobs, and later ones would run eagerly."""
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    for i, compile_ in enumerate(("false", "eager")):
        run_benchmark(compose_config([*QUICK, "method=tent", "run.plot=false", f"method.compile={compile_}"]),
                      tmp_path / str(i))
    assert resets == [1]


@pytest.mark.parametrize("scenario", ["continual", "reset_each_shift", "mixed_domains", "gradual",
                                      "label_shift", "batch_size_1"])
def test_scenario_end_to_end(tmp_path: Path, scenario: str) -> None:
    over = [*QUICK, f"scenario={scenario}", "method=tent", "run.plot=false"]
    if scenario == "batch_size_1":
        # BN test statistics of one image are degenerate: norm mixes in the source ones.
        over = [o for o in over if not o.startswith(("data.num_images", "method=", "run.batch_size"))]
        over += ["data.num_images=8", "method=norm", "method.alpha=0.1"]
    if scenario == "gradual":
        over += ["data.num_images=16", "data.corruptions=[gaussian_noise]", "scenario.severities=[1,3,5]"]
    cfg = compose_config(over)
    res = run_benchmark(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("method", "model", "scenario", "error", "mean_error", "images_per_s", "peak_mem_mb",
                "config", "versions", "git", "steps"):
        assert key in saved, key
    assert saved["scenario"] == scenario and saved["method"] == ("norm" if scenario == "batch_size_1" else "tent")
    assert (tmp_path / "results.csv").read_text().startswith("method,model")
    assert all(0 <= e <= 100 for e in res["error"].values()) and res["images_per_s"] > 0
    assert len(res["steps"]["num_selected"]) == res["num_steps"]
    if scenario == "gradual":
        assert list(res["error"]) == ["gaussian_noise/1", "gaussian_noise/3", "gaussian_noise/5"]
    if scenario == "batch_size_1":
        assert res["num_steps"] == 16
    if scenario == "mixed_domains":
        assert "mixed" in res["steps"]["domain"]


def test_same_seed_same_stream_and_results(tmp_path: Path) -> None:
    cfg = compose_config([*QUICK, "method=tent", "run.plot=false", "run.skip_existing=false"])
    a = run_benchmark(cfg, tmp_path / "a")
    b = run_benchmark(cfg, tmp_path / "b")
    assert a["error"] == b["error"] and a["steps"]["loss"] == b["steps"]["loss"]
    # Different seeds give a different stream.
    cfg, other = read_config(cfg), read_config(compose_config([*QUICK, "run.seed=1"]))
    s0 = build_stream(build_domains(cfg.data, cfg.scenario, seed=0)[0], cfg.scenario, 16, 0)
    s1 = build_stream(build_domains(other.data, other.scenario, seed=1)[0], other.scenario, 16, 1)
    assert not np.array_equal(s0.labels, s1.labels)


def test_reset_each_shift_marks_domain_changes() -> None:
    cfg = read_config(compose_config([*QUICK, "scenario=reset_each_shift", "method=tent", "run.plot=false"]))
    domains, _ = build_domains(cfg.data, cfg.scenario, seed=0)
    stream = build_stream(domains, cfg.scenario, 16, 0)
    assert stream.resets == {2}  # the runner resets the method before this batch
    assert build_stream(domains, read_config(compose_config(QUICK)).scenario, 16, 0).resets == set()
    # a mixed stream has no shift to reset at, and shuffles a label shift away: refused, not ignored
    for extra in ("scenario.reset_each_shift=true", "scenario.label_shift_gamma=0.1"):
        mixed = read_config(compose_config([*QUICK, "scenario=mixed_domains", extra])).scenario
        with pytest.raises(ValueError, match=rf"{extra.split('=')[0]}.*does not go with scenario.mix_domains"):
            build_stream(domains, mixed, 16, 0)


def test_eata_fisher_from_train_split(tmp_path: Path) -> None:
    cfg = compose_config([*QUICK, "method=eata", "method.fisher_size=32", "run.plot=false"])
    res = run_benchmark(cfg, tmp_path)
    assert res["method"] == "eata" and "fisher_loader" not in res["method_overrides"]


def test_missing_data_root_says_what_layout(tmp_path: Path) -> None:
    cfg = compose_config([*QUICK, f"data.root={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="ImageFolder"):
        run_benchmark(cfg, tmp_path / "out")


# ----------------------------------------------------------------------------------
# Command line: single run, sweep + resume, report
# ----------------------------------------------------------------------------------


def test_cli_cfg_job_prints_resolved_config(tmp_path: Path) -> None:
    proc = _bench(["--cfg", "job", "--resolve", "method=deyo", "method.lr=0.01"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["method"]["name"] == "deyo" and cfg["method"]["lr"] == 0.01
    assert cfg["data"]["root"].endswith("data/cifar10/test")


def test_cli_sweep_resume_and_report(tmp_path: Path) -> None:
    quick = [o for o in QUICK if not o.startswith("data.num_images")]
    args = ["-m", "method=source,norm", *quick, "data.num_images=16", "run.out_dir=out"]
    first = _bench(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    sweep = tmp_path / "out" / "multirun"
    jobs = sorted(p.parent for p in sweep.rglob("results.json"))
    assert len(jobs) == 2 and "method=source" in str(jobs[1]) and "method=norm" in str(jobs[0])
    assert (jobs[0] / "results.png").stat().st_size > 0
    assert "| source |" in first.stdout and "| norm |" in first.stdout  # the end-of-sweep report

    # Simulate a sweep killed during its second job: only the first has results.
    done = [j for j in jobs if "method=source" in str(j)][0]
    killed = [j for j in jobs if "method=norm" in str(j)][0]
    (killed / "results.json").unlink()
    stamp = (done / "results.json").stat().st_mtime_ns
    second = _bench(args, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (done / "results.json").stat().st_mtime_ns == stamp  # skipped, not rerun
    assert (killed / "results.json").is_file()
    assert "skipping" in second.stderr + second.stdout + (done / "tta-bench.log").read_text()

    # The report command on the finished sweep.
    proc = subprocess.run([sys.executable, "-m", "tta.bench.report", str(sweep)], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr  # runpy's, when the package imported the module first
    assert "| method | gaussian_noise | contrast | mean | images/s |" in proc.stdout
    assert (sweep / "report.md").read_text().count("\n| ") >= 3
    assert (sweep / "report.png").stat().st_size > 0


def test_cli_sweep_with_a_failed_job_still_reports_the_finished_ones(tmp_path: Path) -> None:
    # Hydra's sweeper raises on a failed job before on_multirun_end: before, the
    # sweep's other jobs ran but no report was printed or written.
    quick = [o for o in QUICK if not o.startswith("data.num_images")]
    args = ["-m", "method=norm", "method.alpha=0.5,-1", *quick, "data.num_images=16", "run.out_dir=out",
            "run.plot=false"]
    proc = _bench(args, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "alpha" in proc.stderr  # the failed job's own message
    sweep = tmp_path / "out" / "multirun"
    assert len(list(sweep.rglob("results.json"))) == 1
    report = (sweep / "report.md").read_text()
    assert "| norm |" in report and "| norm |" in proc.stdout
    assert "without results, failed or not run (1):" in report
    assert "num_images=16 method.alpha=-1 method=norm run.batch_size=16" in report


def test_report_on_empty_folder_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no results.json"):
        make_report(tmp_path)


def test_zoo_model_runs_in_the_bench(tmp_path: Path) -> None:
    # The zoo loader takes the runner's pretrained flag: true loads the checked
    # checkpoint, false the bare architecture.
    cfg = compose_config([*QUICK, "model=zoo_resnet20_bn_jpeg", "method=norm", "run.plot=false"])
    res = run_benchmark(cfg, tmp_path / "zoo")
    assert res["model"] == "zoo:resnet20_bn_jpeg" and res["mean_error"] < 60
    bare = run_benchmark(compose_config([*QUICK, "model=zoo_resnet20_bn_jpeg", "model.pretrained=false",
                                         "run.plot=false"]), tmp_path / "bare")
    assert bare["mean_error"] > 70


def test_layer_norm_vit_runs_deyo_at_batch_size_1_in_the_bench(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    quick = [o for o in QUICK if not o.startswith("run.batch_size=")]  # it would override the scenario's
    cfg = compose_config([*quick, "model=zoo_vit_tiny_ln", "model.pretrained=false", "method=deyo",
                          "scenario=batch_size_1", "data.num_images=6", "run.plot=false"])
    assert cfg.run.batch_size == 1
    res = run_benchmark(cfg, tmp_path / "vit")
    assert res["model"] == "zoo:vit_tiny_ln" and res["batch_size"] == 1
    assert sum(res["steps"]["num_samples"]) == 12 and len(res["steps"]["num_samples"]) == 12


def test_zoo_clip_policy_runs_tpt_in_the_bench(tmp_path: Path) -> None:
    # Random weights (pretrained=false): the bench composes a CLIP model and a CLIP
    # method end to end without the trained checkpoint.
    cfg = compose_config([*QUICK, "data.num_images=8", "data.corruptions=[gaussian_noise]",
                          "model=zoo_clip_small", "model.pretrained=false", "method=tpt",
                          "method.num_views=4", "run.plot=false"])
    res = run_benchmark(cfg, tmp_path)
    assert res["model"] == "zoo:clip_small" and res["num_steps"] == 1
    assert 0 <= res["mean_error"] <= 100
