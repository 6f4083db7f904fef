"""What a user of tta-bench reads and relies on: the same images in every
scenario, reports that label their rows, short folder names, readable numbers and
logs, and errors without a traceback (issue 22)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tta.bench import compose_config, run_benchmark
from tta.bench.render import BatchRenderer
from tta.bench.settings import read_config
from tta.bench.sources import build_domains
from tta.bench.stream import BatchLoader, build_stream
from tta.data import imagenet_wnids

GN_QUICK = [
    "model=zoo_resnet26_gn",
    "method=source",
    "data.corruptions=[gaussian_noise,fog]",
    "data.num_images=40",
    "run.batch_size=16",
    "run.device=cpu",
    "run.progress=false",
    "run.plot=false",
    "run.num_threads=1",
]


def test_source_error_is_the_same_in_every_scenario_on_a_batch_independent_model(tmp_path: Path) -> None:
    # GroupNorm predicts each image alone, so with the same corrupted images every
    # scenario (order, mixing, resets, batch size) must give the same source error.
    errors = {}
    for scenario in ("continual", "label_shift", "mixed_domains", "reset_each_shift", "batch_size_1"):
        extra = ["run.batch_size=1"] if scenario == "batch_size_1" else []
        res = run_benchmark(compose_config([*GN_QUICK, f"scenario={scenario}", *extra]), tmp_path / scenario)
        errors[scenario] = res["error"]
    first = errors["continual"]
    assert set(first) == {"gaussian_noise", "fog"}
    for scenario, err in errors.items():
        assert err == first, f"{scenario}: {err} != continual {first}"


def _rendered_by_image(over: list[str]) -> dict[tuple[str, int], torch.Tensor]:
    cfg = read_config(compose_config(over))
    domains, n_cls = build_domains(cfg.data, cfg.scenario, seed=0)
    stream = build_stream(domains, cfg.scenario, cfg.run.batch_size, 0, n_cls)
    loader = BatchLoader(stream, torch.device("cpu"))
    render = BatchRenderer(stream, seed=0, preset=cfg.data.preset, input_size=None)
    out = {}
    for batch in loader:
        x = render(batch)
        s, e = stream.batches[batch.index]
        for j, (d, p) in enumerate(zip(stream.dom[s:e], stream.pos[s:e])):
            domain = stream.domains[int(d)]
            out[(domain.name, int(domain.image_ids[p]))] = x[j]
    return out


def test_a_rendered_image_depends_on_seed_domain_and_image_only() -> None:
    base = ["data.corruptions=[shot_noise,snow]", "data.num_images=24", "run.device=cpu"]
    a = _rendered_by_image([*base, "run.batch_size=8"])
    b = _rendered_by_image([*base, "run.batch_size=5", "scenario=mixed_domains"])
    assert a.keys() == b.keys() and len(a) == 48
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a different image, or the same image in another domain, gets other noise
    (name, i), (_, j) = sorted(a)[:2]
    assert not torch.equal(a[(name, i)], a[(name, j)])


# ----------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------


def _fake_sweep(root: Path, jobs: list[tuple[str, str, float]]) -> None:
    for n, (method, scenario, lr) in enumerate(jobs):
        job = root / f"job{n}"
        job.mkdir(parents=True)
        err = {"gaussian_noise": 40.0 + n, "fog": 30.0 + n}
        (job / "results.json").write_text(json.dumps({
            "method": method, "model": "cifar10_resnet20", "data": "cifar10c", "scenario": scenario,
            "error": err, "mean_error": 35.0 + n, "images_per_s": 100.0, "batch_size": 64, "device": "cpu",
            "domains": [{"name": k, "num_images": 10} for k in err], "config": {"data": {"severity": 5}},
            "hydra": {"job_num": n, "overrides": [f"method={method}", f"scenario={scenario}", f"method.lr={lr}"]},
        }))


def test_report_rows_carry_their_own_scenario(tmp_path: Path) -> None:
    from tta.bench import make_report

    _fake_sweep(tmp_path, [("source", "label_shift", 1e-3), ("tent", "label_shift", 1e-3),
                           ("source", "mixed_domains", 1e-3), ("tent", "mixed_domains", 1e-3)])
    text = make_report(tmp_path)
    assert "| method | scenario | gaussian_noise | fog | mean | images/s |" in text
    assert "| source | label_shift | 40.0 |" in text and "| tent | mixed_domains | 43.0 |" in text
    # the header names what all rows share, not the first job's scenario
    assert "scenario: 2 scenarios (per row)" in text and "scenario: label_shift" not in text
    assert "model: cifar10_resnet20" in text
    assert (tmp_path / "report.png").stat().st_size > 0


@pytest.mark.parametrize("num_jobs", [1, 24])
def test_report_plot_holds_every_legend_label(tmp_path: Path, num_jobs: int) -> None:
    import matplotlib.image as mpimg

    from tta.bench.report import plot_comparison
    from tta.bench.report import collect_results

    jobs = [(m, s, lr) for s in ("label_shift", "mixed_domains", "continual")
            for m in ("source", "norm", "tent", "deyo") for lr in (1e-3, 5e-3)][:num_jobs]
    _fake_sweep(tmp_path, jobs)
    png = tmp_path / "plot.png"
    png.write_bytes(plot_comparison(collect_results(tmp_path)))
    h, w = mpimg.imread(png).shape[:2]
    # the legend sits below the axes: the figure grows with the jobs instead of
    # letting a wide legend spill over (and clip) the bars
    assert w <= 20 * 110 + 50 and h >= 400
    assert w >= 700


# ----------------------------------------------------------------------------------
# Command line: errors, folder names, help
# ----------------------------------------------------------------------------------


def test_config_error_prints_the_message_alone_and_leaves_no_folder(tmp_path: Path) -> None:
    from test_bench import _bench

    proc = _bench(["run.seed=-3", "run.out_dir=out"], tmp_path)
    assert proc.returncode != 0
    assert "run.seed must be an integer" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
    assert not (tmp_path / "out").exists(), list((tmp_path / "out").rglob("*"))

    import os

    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        full = _bench(["run.seed=-3", "run.out_dir=out"], tmp_path)
    finally:
        del os.environ["HYDRA_FULL_ERROR"]
    assert full.returncode != 0 and "Traceback" in full.stderr


def test_sweep_job_error_is_reported_by_its_message(tmp_path: Path) -> None:
    from test_bench import _bench

    proc = _bench(["-m", "run.seed=-3", "run.out_dir=out"], tmp_path)
    assert proc.returncode != 0
    assert "run.seed must be an integer" in proc.stderr and "Traceback" not in proc.stderr


# tta-bench in an environment without hydra-submitit-launcher (the bench extra
# installs it): the plugin's module is not found.
_WITHOUT_SUBMITIT = """
import importlib.util, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: (
    None if name.startswith("hydra_plugins.hydra_submitit_launcher") else find_spec(name, *a))
from tta.bench.app import main
sys.argv = ["tta-bench", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("launcher", ["slurm", "submitit_local"])
def test_missing_launcher_plugin_names_the_package(tmp_path: Path, launcher: str) -> None:
    from test_bench import _env

    proc = subprocess.run([sys.executable, "-c", _WITHOUT_SUBMITIT, "-m", f"hydra/launcher={launcher}",
                           "method=source"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "pip install hydra-submitit-launcher" in proc.stderr and "Traceback" not in proc.stderr


def test_help_offers_no_optimizer_keys_for_source(tmp_path: Path) -> None:
    from test_bench import _bench

    proc = _bench(["--help"], tmp_path)
    assert proc.returncode == 0
    method = proc.stdout.split("method:", 1)[1].split("\ndata:", 1)[0]
    assert "name: source" in method
    for key in ("optimizer:", "lr:", "momentum:", "betas:", "collapse_guard:", "bn_alpha:"):
        assert key not in method, f"{key} under method: source in --help"


def test_job_folder_names_are_short_stable_and_distinct() -> None:
    from tta.bench.config import dirname_from_overrides

    corruptions = "[gaussian_noise,shot_noise,impulse_noise,defocus_blur,contrast,brightness,pixelate,jpeg_compression]"
    name = dirname_from_overrides(f"data.corruptions={corruptions},data.num_images=1000,method=deyo")
    assert len(name) <= 70 and name.startswith("data.corruptions=8items-") and name.endswith(",method=deyo")
    assert name == dirname_from_overrides(f"data.corruptions={corruptions},data.num_images=1000,method=deyo")
    other = dirname_from_overrides("data.corruptions=[gaussian_noise,shot_noise,impulse_noise,defocus_blur,"
                                   "contrast,brightness,pixelate,fog],data.num_images=1000,method=deyo")
    assert other != name
    # short values stay as they are; paths keep their last component
    assert dirname_from_overrides("method=tent,method.lr=0.001") == "method=tent,method.lr=0.001"
    path = dirname_from_overrides("data.root=/data/sets/imagenet/ImageNet-C-full,method=tent")
    assert path.startswith("data.root=ImageNet-C-full-") and "/" not in path


# ----------------------------------------------------------------------------------
# results.json and logs
# ----------------------------------------------------------------------------------


def test_results_json_rounds_figures_and_keeps_steps(tmp_path: Path, caplog) -> None:
    import logging

    over = [*GN_QUICK, "model=cifar10_resnet20", "data.num_images=30", "data.corruptions=[fog]",
            "run.batch_size=64"]
    with caplog.at_level(logging.INFO, logger="tta.bench"):
        res = run_benchmark(compose_config(over), tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    for value in [*saved["error"].values(), saved["mean_error"], *saved["ece"].values()]:
        assert value == round(value, 8) and len(repr(value)) <= 12, value
    assert saved["images_per_s"] == round(saved["images_per_s"], 2)
    assert saved["error"] == res["error"]
    text = caplog.text
    # one domain, one batch: singular nouns, and a rate that is not printed as 0
    assert "1 domain," in text and "1 batch of 30" in text and "30 images" in text  # as cut, not run.batch_size
    assert " 0 images/s" not in text and "1 domains" not in text


def test_num_images_beyond_the_folder_says_so_once(tmp_path: Path, caplog) -> None:
    import logging

    from PIL import Image

    root = tmp_path / "few"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    cfg = read_config(compose_config(["data.corruptions=[fog,contrast,brightness]", f"data.root={root}",
                                      "data.num_images=5000", "model.pretrained=false"]))
    with caplog.at_level(logging.WARNING, logger="tta.bench"):
        domains, _ = build_domains(cfg.data, cfg.scenario, seed=0)
    assert [len(d) for d in domains] == [6, 6, 6]
    warnings = [r.getMessage() for r in caplog.records if "data.num_images" in r.getMessage()]
    assert len(warnings) == 1 and "5000" in warnings[0] and "running 6 images per domain" in warnings[0]


def test_long_runs_announce_their_time(caplog) -> None:
    import logging

    from tta.bench.loop import TimeEstimate

    with caplog.at_level(logging.INFO, logger="tta.bench"):
        est = TimeEstimate(10_000)
        for b in range(8):  # 10 images/s after the first batch
            est.update(10, now=float(b))
        short = TimeEstimate(60)
        for b in range(6):
            short.update(10, now=float(b) * 3)
    messages = [r.getMessage() for r in caplog.records if "estimated time" in r.getMessage()]
    assert len(messages) == 1, messages
    assert "17 min" in messages[0] and "9940 images" in messages[0]


def test_counts_read_right() -> None:
    from tta.bench.loop import count

    assert [count(1, "domain"), count(2, "domain"), count(1, "batch"), count(3, "batch")] == [
        "1 domain", "2 domains", "1 batch", "3 batches"]


# ----------------------------------------------------------------------------------
# Class folders: the same rule in tta-data and tta-bench, the same labels in every domain
# ----------------------------------------------------------------------------------


def _class_tree(root: Path, classes, per_class: int = 2, size: int = 8) -> Path:
    from PIL import Image

    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((size, size, 3), (20 * k + i) % 256, np.uint8)).save(root / c / f"{i}.png")
    return root


def _imagenetc_domains(root: Path, *over: str):
    cfg = read_config(compose_config(["data=imagenetc", f"data.root={root}", "data.corruptions=[gaussian_noise,fog]",
                                      "data.num_images=null", *over]))
    return build_domains(cfg.data, cfg.scenario, input_size=(8, 8), seed=0)


def test_class_index_folder_needs_the_same_class_folders_in_every_domain(tmp_path: Path) -> None:
    # numbered per domain, a folder spelled 'plane' in fog would shift every fog label
    _class_tree(tmp_path / "gaussian_noise" / "5", ["airplane", "bird", "cat"])
    _class_tree(tmp_path / "fog" / "5", ["bird", "cat", "plane"])
    with pytest.raises(ValueError) as err:
        _imagenetc_domains(tmp_path, "data.class_index=folder")
    msg = str(err.value)
    assert str(tmp_path / "fog" / "5") in msg and "['airplane']" in msg and "['plane']" in msg
    # the same folders in every domain: each class has one label everywhere
    (tmp_path / "fog" / "5" / "plane").rename(tmp_path / "fog" / "5" / "airplane")
    domains, num_classes = _imagenetc_domains(tmp_path, "data.class_index=folder")
    assert num_classes == 3
    for d in domains:
        assert {d.pool.files[r].parent.name: int(lab) for r, lab in zip(d.rows, d.labels)} == {
            "airplane": 0, "bird": 1, "cat": 2}
    # wnid folders are labelled by name: domains may hold different subsets
    wnids = imagenet_wnids()
    _class_tree(tmp_path / "w" / "gaussian_noise" / "5", wnids[:2])
    _class_tree(tmp_path / "w" / "fog" / "5", wnids[1:3])
    domains, _ = _imagenetc_domains(tmp_path / "w")
    assert [sorted(set(d.labels.tolist())) for d in domains] == [[0, 1], [1, 2]]


def test_hidden_and_system_folders_are_never_classes(tmp_path: Path) -> None:
    from tta.data import list_image_folder
    from tta.data.prepare import check_imagenetc_folder

    stray = [".ipynb_checkpoints", ".hidden", "__MACOSX", "@eaDir"]
    root = _class_tree(tmp_path / "folder", ["a", "b"])
    for name in stray:  # with an image inside, as a checkpoint copy or a thumbnail would be
        _class_tree(root, [name], per_class=1)
    assert list_image_folder(root)[2] == ["a", "b"]
    cfg = read_config(compose_config(["data=imagefolder_c", f"data.root={root}", "data.corruptions=[fog]",
                                      "data.num_images=null"]))
    domains, num_classes = build_domains(cfg.data, cfg.scenario, input_size=(8, 8), seed=0)
    assert num_classes == 2 and sorted(domains[0].labels.tolist()) == [0, 0, 1, 1]
    # ImageNet-C: what tta-data calls usable, tta-bench reads (both skip the same folders)
    inc = tmp_path / "inc"
    _class_tree(inc / "fog" / "5", imagenet_wnids(), per_class=1, size=4)
    for name in stray:
        _class_tree(inc / "fog" / "5", [name], per_class=1)
    report = check_imagenetc_folder(inc, ["fog"], [5], progress=False)
    assert report.usable, report.summary()
    cfg = read_config(compose_config(["data=imagenetc", f"data.root={inc}", "data.corruptions=[fog]",
                                      "data.num_images=3"]))
    assert build_domains(cfg.data, cfg.scenario, input_size=(4, 4), seed=0)[1] == 1000
    # any other folder that is not a wnid is refused by both
    _class_tree(inc / "fog" / "5", ["extra"], per_class=1)
    report = check_imagenetc_folder(inc, ["fog"], [5], progress=False)
    assert not report.usable and "extra" in report.bad["fog/5"]
    with pytest.raises(ValueError, match="extra"):
        build_domains(cfg.data, cfg.scenario, input_size=(4, 4), seed=0)


def test_macos_appledouble_files_are_not_images(tmp_path: Path) -> None:
    # A tree copied from a Mac to a foreign disk (or unzipped) has a hidden
    # ``._<name>`` of metadata beside every image; counted, each was an image that
    # failed to decode (tta-bench refused the stream) and was counted by tta-data.
    from tta.data import list_image_folder
    from tta.data.prepare import check_imagenetc_folder

    root = _class_tree(tmp_path / "folder", ["a", "b"])
    for image in list(root.glob("*/*.png")):
        (image.parent / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07Mac OS X        ")
    files = list_image_folder(root)[0]
    assert len(files) == 4 and not any(f.name.startswith("._") for f in files)
    cfg = read_config(compose_config(["data=imagefolder_c", f"data.root={root}", "data.corruptions=[fog]",
                                      "data.num_images=null"]))
    domains, _ = build_domains(cfg.data, cfg.scenario, input_size=(8, 8), seed=0)
    assert len(domains[0].labels) == 4
    inc = _class_tree(tmp_path / "inc" / "fog" / "5", imagenet_wnids(), per_class=1, size=4)
    (inc / imagenet_wnids()[0] / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    report = check_imagenetc_folder(tmp_path / "inc", ["fog"], [5], progress=False)
    assert report.usable and "images: 1000 in each" in report.summary(), report.summary()


def test_a_class_count_mismatch_names_the_class_folders(tmp_path: Path) -> None:
    from tta.bench.stream import open_stream

    root = _class_tree(tmp_path / "folder", ["a", "b", "notes"])
    cfg = read_config(compose_config(["data=imagefolder_c", f"data.root={root}", "data.corruptions=[fog]"]))
    with pytest.raises(ValueError, match=r"3 classes \(the class folders of .*folder: a, b, notes; move out"):
        open_stream(cfg.data, cfg.scenario, cfg.run, torch.device("cpu"), input_size=(8, 8), model_classes=2,
                    model_name="m")


@pytest.mark.parametrize("labels, expected", [
    (np.array([-1, 0] * 5), r"negative labels \(min -1, max 0\): expected class indices"),
    (np.array([0.7, 1.7] * 5, np.float32), r"holds float32 \(10,\): expected integers \(5 \* N,\)"),
    (np.zeros((10, 1), np.int64), r"holds int64 \(10, 1\): expected integers \(5 \* N,\)"),
    (None, "not a readable .npy file"),
])
def test_cifar10c_disk_checks_labels_npy_as_tta_data_does(tmp_path: Path, labels, expected) -> None:
    from tta.data.prepare import check_cifar10c_folder

    np.save(tmp_path / "fog.npy", np.zeros((10, 32, 32, 3), np.uint8))
    if labels is None:
        (tmp_path / "labels.npy").write_bytes(b"not an array")
    else:
        np.save(tmp_path / "labels.npy", labels)
    cfg = read_config(compose_config(["data=cifar10c_disk", f"data.root={tmp_path}", "data.corruptions=[fog]"]))
    with pytest.raises(ValueError, match=expected) as err:
        build_domains(cfg.data, cfg.scenario, seed=0)
    assert str(tmp_path / "labels.npy") in str(err.value)
    # tta-data cifar10-c refuses the same file (its labels: CIFAR-10's 0..9)
    assert "labels.npy" in check_cifar10c_folder(tmp_path, ["fog"]).bad


def test_crop_ratio_leaves_an_image_already_at_the_size_whole_as_documented() -> None:
    # Deliberate (ImageNet-C's files are 224-px centre crops already): such an image
    # is not cropped again; any other size is resized to size / crop_ratio and
    # centre-cropped. A folder of mixed sizes then mixes fields of view, which the
    # docs of crop_ratio say.
    import tempfile

    from PIL import Image

    from tta.bench import config_dir
    from tta.bench.files import decode_image

    rng = np.random.default_rng(0)
    small, big = rng.integers(0, 256, (8, 8, 3), np.uint8), rng.integers(0, 256, (16, 16, 3), np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        Image.fromarray(small).save(f"{tmp}/small.png")
        Image.fromarray(big).save(f"{tmp}/big.png")
        assert torch.equal(decode_image(f"{tmp}/small.png", 8, 0.5), torch.from_numpy(small).permute(2, 0, 1))
        assert torch.equal(decode_image(f"{tmp}/big.png", 8, 0.5), torch.from_numpy(big[4:12, 4:12]).permute(2, 0, 1))
    assert "used whole" in (config_dir() / "data_base.yaml").read_text()


def test_a_mistyped_key_is_named_with_the_key_meant() -> None:
    # run.batchsize=8: Hydra said "Key 'batchsize' is not in struct" and suggested
    # +run.batchsize=8, which the config check then refused.
    from tta.bench.app import _check_keys

    with pytest.raises(SystemExit, match=r"run.batchsize is not a key of run \(did you mean run.batch_size\?"):
        _check_keys(["-m", "method=tent,norm", "run.batchsize=8,16"])
    with pytest.raises(SystemExit, match=r"data.corruption is not a key of data \(did you mean data.corruptions\?"):
        _check_keys(["data.corruption=[fog]"])
    # keys that exist, method keys (each method has its own) and Hydra's own pass
    _check_keys(["run.batch_size=8", "data.corruptions=[fog,snow]", "scenario=gradual", "method.lrr=1",
                 "hydra.sweep.dir=x", "model.name=cifar10_resnet32"])


def test_a_failed_run_removes_no_folder_above_run_out_dir(tmp_path: Path) -> None:
    # The empty folders a failed run leaves are removed up to run.out_dir; it walked on
    # up to the working directory, removing the user's own empty folders above it.
    from test_bench import _bench

    (tmp_path / "cwd").mkdir()
    mine = tmp_path / "mine"
    mine.mkdir()
    proc = _bench(["run.seed=-3", f"run.out_dir={mine / 'experiments'}"], tmp_path / "cwd")
    assert proc.returncode != 0 and "run.seed must be an integer" in proc.stderr
    assert mine.is_dir() and not (mine / "experiments").exists()
