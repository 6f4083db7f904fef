"""tta.bench: config documentation and shipping, launchers, the loader's two paths,
clear errors, and the command line (single runs, joblib and submitit sweeps).

tests/test_bench.py covers the data sources, the scenarios end to end, resume and
the report; this file covers the rest. Runs offline on $TTA_HOME (the shared
CIFAR-10 JPEGs and ResNet-20 weights), with runs of a few batches of 8 images.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("hydra")

import tta  # noqa: E402
from tta.bench import compose_config, config_dir, run_benchmark  # noqa: E402
from tta.bench.config import NON_RESULT_KEYS, config_hash, dirname_from_overrides, method_overrides  # noqa: E402
from tta.bench.methodconf import configurable_defaults  # noqa: E402
from tta.bench.settings import read_config  # noqa: E402
from tta.bench.sources import build_domains  # noqa: E402
from tta.data import imagenet_wnids  # noqa: E402
from tta.bench.stream import BatchLoader, build_stream  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CIFAR_TEST = tta.tta_home() / "data" / "cifar10" / "test"
needs_cifar = pytest.mark.skipif(
    not CIFAR_TEST.is_dir() or not (tta.tta_home() / "models" / "cifar10").is_dir(),
    reason="needs $TTA_HOME/data/cifar10 and $TTA_HOME/models/cifar10",
)

# Cheap corruptions keep the runs fast; the runner renders them on the fly.
# One thread: tiny batches gain nothing from two, and lose a lot when the other
# core is busy.
TINY = ["data.corruptions=[contrast,pixelate]", "data.num_images=16", "run.batch_size=8",
        "run.device=cpu", "run.progress=false", "run.plot=false", "run.num_threads=1"]
CLI_TINY = ["data.corruptions=[contrast]", "data.num_images=16", "run.batch_size=8", "run.device=cpu",
            "run.progress=false"]
REQUIRED_KEYS = {"method", "model", "scenario", "error", "mean_error", "images_per_s", "peak_mem_mb",
                 "config", "config_hash", "versions", "git", "steps"}


def _cli(args: list[str], cwd: Path, module: str = "tta.bench", timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, TTA_HOME=str(tta.tta_home()), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


# ----------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------


def test_method_yaml_generator_round_trips():
    from omegaconf import OmegaConf

    # Each method file composed with the shared files it includes holds exactly
    # the Python defaults (test_bench), and with a preset the preset's values (what runs).
    for name in tta.list_methods():
        assert set(OmegaConf.to_container(compose_config([f"method={name}"]).method)) - {"name", "preset"} == set(
            configurable_defaults(name))
        for preset in tta.method_presets(name):
            cfg = compose_config([f"method={name}", f"method.preset={preset}"])
            data = OmegaConf.to_container(cfg.method, resolve=True)
            expected = {k: list(v) if isinstance(v, tuple) else v
                        for k, v in tta.method_defaults(name, preset=preset).items() if k in data}
            assert {k: v for k, v in data.items() if k not in ("name", "preset")} == {
                k: v for k, v in expected.items() if k not in ("name", "preset")}, (name, preset)


def test_method_preset_follows_the_data_set_unless_told():
    from tta.bench.config import method_preset

    cfg = compose_config(["method=eata"])
    assert cfg.data.name == "cifar10c" and method_preset(cfg.method, cfg.data.name) == "cifar10"
    assert method_preset(cfg.method, "imagenetc") == "imagenet"
    assert method_preset(cfg.method, "imagefolder_c") is None
    assert method_preset(compose_config(["method=eata", "method.preset=none"]).method, "cifar10c") is None
    assert method_preset(compose_config(["method=eata", "method.preset=imagenet"]).method, "cifar10c") == "imagenet"
    with pytest.raises(ValueError, match="method.preset='cifar100'.*cifar10, imagenet"):
        method_preset(compose_config(["method=eata", "method.preset=cifar100"]).method, "cifar10c")
    # batch size 1: the published batch-200 settings do not apply
    cfg = compose_config(["method=sar", "scenario=batch_size_1"])
    assert method_preset(cfg.method, cfg.data.name) is None


def test_method_overrides_pass_only_changes():
    from tta.bench.config import method_preset

    for name in tta.list_methods():
        # The YAML passes nothing to wrap(): the Python defaults and presets rule.
        cfg = compose_config([f"method={name}"])
        assert method_overrides(cfg.method, method_preset(cfg.method, cfg.data.name)) == (name, {})
    cfg = compose_config(["method=tent", "method.lr=0.01", "method.betas=[0.8,0.9]"])
    assert method_overrides(cfg.method, "cifar10") == ("tent", {"lr": 0.01, "betas": (0.8, 0.9)})
    assert "fisher_loader" not in configurable_defaults("eata")
    with pytest.raises(Exception, match="lrr"):
        compose_config(["method=tent", "method.lrr=0.1"])  # typos are refused


def test_a_default_given_on_the_command_line_beats_the_preset():
    # DeYO's cifar10 preset uses Adam; SGD is its default. Typed out, SGD must win, in
    # the composed config itself (what the Python API runs, what the hash and
    # results.json record), not only on the command line.
    from tta.bench.config import config_hash, method_preset

    plain, typed = compose_config(["method=deyo"]), compose_config(["method=deyo", "method.optimizer=sgd"])
    preset = method_preset(typed.method, typed.data.name)
    assert preset == "cifar10" and tta.method_defaults("deyo", preset=preset)["optimizer"] == "adam"
    assert plain.method.optimizer == "adam" and typed.method.optimizer == "sgd"
    assert config_hash(plain) != config_hash(typed)
    assert method_overrides(plain.method, preset) == ("deyo", {})
    name, overrides = method_overrides(typed.method, preset)
    assert overrides == {"optimizer": "sgd"}
    assert tta.wrap(_tiny_bn_model(), name, preset=preset, **overrides).optimizer.__class__.__name__ == "SGD"
    # no preset: the Python defaults
    assert compose_config(["method=deyo", "method.preset=none"]).method.optimizer == "sgd"


def _tiny_bn_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 3))


def _leaf_keys_without_comment(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([\w./]+):\s*(\S.*)?$", line)
        if not m or line.lstrip().startswith("-") or m.group(2) == "defaults" or m.group(3) is None:
            continue
        j = i - 1
        # One comment may introduce a group of consecutive keys.
        while j >= 0 and re.match(rf"^{m.group(1)}[\w./]+:\s*\S", lines[j]):
            j -= 1
        if j < 0 or not lines[j].strip().startswith("#"):
            missing.append(f"{path.relative_to(config_dir())}:{i + 1}: {line.strip()}")
    return missing


def test_every_config_value_is_documented():
    files = sorted(config_dir().rglob("*.yaml"))
    assert len(files) >= 20
    assert [m for f in files for m in _leaf_keys_without_comment(f)] == []


def test_every_group_option_composes():
    groups = {g: sorted(p.stem for p in (config_dir() / g).glob("*.yaml"))
              for g in ("model", "method", "data", "scenario")}
    assert set(groups["method"]) == set(tta.list_methods())
    assert {f"cifar10_resnet{d}" for d in (20, 32, 44, 56)} <= set(groups["model"])
    for group, names in groups.items():
        for name in names:
            cfg = compose_config([f"{group}={name}", "data.root=/x"])
            assert cfg[group].name == name or group == "model"
    assert compose_config(["scenario=batch_size_1", "run.batch_size=2"]).run.batch_size == 2
    cfg = compose_config(["hydra/launcher=joblib_local"], return_hydra_config=True)
    assert cfg.hydra.launcher.n_jobs == 2 and "JoblibLauncher" in cfg.hydra.launcher._target_
    cfg = compose_config(["method=tent"], return_hydra_config=True)
    assert cfg.hydra.callbacks.report._target_ == "tta.bench.callbacks.ReportOnMultirunEnd"


def test_slurm_launcher_config_is_valid_for_the_installed_plugin(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(config_dir() / "hydra" / "launcher" / "slurm.yaml"))
    assert data.pop("defaults") == ["submitit_slurm"]
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")  # in the bench extra
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    from submitit.slurm.slurm import SlurmExecutor

    # Each key is one of the plugin's dataclass, with a value of its type (an
    # unknown key or a wrong type raises here).
    OmegaConf.merge(OmegaConf.structured(SlurmQueueConf), data)
    sweep = tmp_path / "sweep"
    overrides = ["hydra/launcher=slurm", f"hydra.sweep.dir={sweep}", "hydra.launcher.partition=gpu",
                 "hydra.launcher.setup=[module load cuda]"]
    cfg = compose_config(overrides, return_hydra_config=True)
    # (Hydra's plugin scan loads the module once more: the same class by name)
    assert OmegaConf.get_type(cfg.hydra.launcher).__qualname__ == SlurmQueueConf.__qualname__

    # The plugin's own launch() up to the submission: submitit checks every
    # parameter against sbatch's, then writes the sbatch script. No SLURM here:
    # srun is not looked for, and the array is not submitted.
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    submitted = {}

    def map_array(executor, fn, *args):
        submitted.update(executor=executor._executor, args=args)
        raise InterruptedError("not submitted")

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)

    def launch(cfg):
        launcher = instantiate(cfg.hydra.launcher)
        launcher.config = cfg  # what Hydra's launcher.setup() sets
        with pytest.raises(InterruptedError):
            launcher.launch([["method=source"], ["method=tent"]], initial_job_idx=0)

    launch(cfg)
    executor = submitted["executor"]
    assert submitted["args"][0] == (["method=source"], ["method=tent"])
    script = executor._make_submission_file_text("python -m submitit.core._submit", "0")
    for option in (f"time={data['timeout_min']}", f"cpus-per-task={data['cpus_per_task']}",
                   f"gpus-per-node={data['gpus_per_node']}", f"mem={data['mem_gb']}GB", f"nodes={data['nodes']}",
                   "partition=gpu", "job-name=tta-bench", f"output={sweep}/.submitit/%j/%j_0_log.out"):
        assert f"#SBATCH --{option}\n" in script, (option, script)
    assert "\nmodule load cuda\n" in script
    assert executor.parameters["array_parallelism"] == data["array_parallelism"]
    # A key submitit does not know does not get through.
    with pytest.raises(NameError, match="bogus"):
        launch(compose_config(overrides + ["+hydra.launcher.bogus=1"], return_hydra_config=True))


def test_hash_ignores_settings_that_do_not_change_results():
    base = config_hash(compose_config(TINY))
    assert config_hash(compose_config(TINY + ["run.progress=true", "data.num_workers=0"])) == base
    assert config_hash(compose_config(TINY + ["run.seed=1"])) != base
    assert "run.progress" in NON_RESULT_KEYS


def test_configs_ship_as_package_data():
    # conf/ is where people edit; the package sees the same files (tta/bench/conf
    # links there) and setup.cfg's package_data globs must cover all of them.
    assert config_dir().resolve() == (REPO / "conf").resolve()
    import configparser
    from fnmatch import fnmatch

    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    globs = [g.strip() for g in parser["options.package_data"]["tta.bench"].splitlines() if g.strip()]
    assert "imagenet_wnids.txt" in parser["options.package_data"]["tta.data"]
    for f in (REPO / "conf").rglob("*.yaml"):
        rel = "conf/" + f.relative_to(REPO / "conf").as_posix()
        assert any(fnmatch(rel, g) and rel.count("/") == g.count("/") for g in globs), rel
    entry = parser["options.entry_points"]["console_scripts"]
    assert "tta-bench = tta.bench.app:main" in entry and "tta-bench-report = tta.bench.report:main" in entry


def test_the_report_module_runs_without_runpy_warning(tmp_path):
    """``python -m tta.bench.report`` warned that the module was in sys.modules before
    it ran (the package imported it): the package now loads its names on first use."""
    proc = _cli(["--help"], tmp_path, module="tta.bench.report", timeout=120)
    assert "usage: tta-bench-report" in proc.stdout and "RuntimeWarning" not in proc.stderr, proc.stderr
    import tta.bench

    assert sorted(tta.bench.__all__) == sorted(n for n in dir(tta.bench) if n in tta.bench.__all__)
    assert tta.bench.make_report.__module__ == "tta.bench.report"
    with pytest.raises(AttributeError, match="has no attribute 'make_reprot'"):
        tta.bench.make_reprot


def test_dirname_from_overrides():
    assert dirname_from_overrides("") == "default"
    assert dirname_from_overrides("data.root=/a/b,method=tent") == "data.root=_a_b,method=tent"
    long = dirname_from_overrides("data.corruptions=[" + ",".join(["gaussian_noise"] * 30) + "]")
    assert len(long.encode()) <= 200 and long != dirname_from_overrides("x" * 500)


def test_imagenet_wnids_match_timm():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids) and wnids[0] == "n01440764"
    timm_data = pytest.importorskip("timm.data")
    assert list(wnids) == list(timm_data.ImageNetInfo().label_names())


# ----------------------------------------------------------------------------------
# Loading and errors
# ----------------------------------------------------------------------------------


@needs_cifar
def test_dataloader_workers_give_the_cached_batches(tmp_path):
    from PIL import Image

    from tta.data import load_image_folder

    x, _ = load_image_folder(CIFAR_TEST, 8, seed=5)
    for i in range(8):
        folder = tmp_path / "fog" / "5" / imagenet_wnids()[(i % 2) * 999]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(folder / f"{i}.JPEG")
    cfg = read_config(compose_config(["data=imagenetc", f"data.root={tmp_path}", "data.corruptions=[fog]",
                                      "data.image_size=40", "data.num_images=null"]))
    domains, num_classes = build_domains(cfg.data, cfg.scenario, seed=0)
    assert num_classes == 1000 and sorted(set(domains[0].labels.tolist())) == [0, 999]
    stream = build_stream(domains, cfg.scenario, 3, 0)
    cache = BatchLoader(stream, torch.device("cpu"))
    assert cache.cached
    workers = BatchLoader(stream, torch.device("cpu"), cache_mb=0, num_workers=2)
    assert not workers.cached
    a, b = list(cache), list(workers)
    assert [t.images.shape for t in b] == [(3, 3, 40, 40)] * 2 + [(2, 3, 40, 40)]
    assert all(torch.equal(p.images, q.images) and torch.equal(p.labels, q.labels) for p, q in zip(a, b))


@needs_cifar
def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown corruption"):
        run_benchmark(compose_config(TINY + ["data.corruptions=[gaussian_nosie]"]), tmp_path)
    with pytest.raises(FileNotFoundError, match="labels.npy"):
        run_benchmark(compose_config(TINY + ["data=cifar10c_disk", f"data.root={tmp_path}"]), tmp_path)
    with pytest.raises(ValueError, match="data.source_root"):
        run_benchmark(compose_config(TINY + ["method=eata", "data.source_root=null"]), tmp_path)
    with pytest.raises(ValueError, match="1000 classes"):
        folder = tmp_path / "inet" / "contrast" / "5" / imagenet_wnids()[3]
        folder.mkdir(parents=True)
        from PIL import Image

        Image.new("RGB", (32, 32)).save(folder / "a.JPEG")
        run_benchmark(compose_config(TINY + ["data=imagenetc", f"data.root={tmp_path / 'inet'}",
                                             "data.corruptions=[contrast]"]), tmp_path)
    # a ??? left in a YAML (OmegaConf's traceback before), a device this build lacks
    with pytest.raises(ValueError, match=r"data.root is missing.*data.root=<value>"):
        run_benchmark(compose_config(TINY + ["data=imagefolder_c"]), tmp_path)
    from tta.bench.runner import resolve_device

    if not torch.backends.mps.is_available():
        with pytest.raises(RuntimeError, match=r"run.device=mps cannot be used.*use run.device=cpu"):
            resolve_device("mps")


@needs_cifar
def test_changed_config_reruns_in_place(tmp_path):
    first = run_benchmark(compose_config(TINY + ["method=source"]), tmp_path)
    again = run_benchmark(compose_config(TINY + ["method=source", "run.progress=true"]), tmp_path)
    assert again.get("skipped") and again["config_hash"] == first["config_hash"]
    changed = run_benchmark(compose_config(TINY + ["method=source", "data.num_images=8"]), tmp_path)
    assert not changed.get("skipped") and changed["num_images"] == 16
    assert json.loads((tmp_path / "results.json").read_text())["config_hash"] == changed["config_hash"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_meta_device_is_refused_before_the_run_sets_up():
    # meta tensors hold no values: the run loaded data, model and method, then
    # failed on the first batch with "META device type not an accelerator".
    from tta.bench.runner import resolve_device

    with pytest.raises(RuntimeError, match=r"run.device=meta holds no data.*use run.device=cpu"):
        resolve_device("meta")


def test_auto_device_says_when_the_gpus_are_hidden(monkeypatch, caplog):
    from tta.bench.runner import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with caplog.at_level("WARNING", logger="tta.bench"):
        assert resolve_device("auto") == torch.device("cpu")
    assert not caplog.records
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what submitit_local sets without gpus_per_node
    with caplog.at_level("WARNING", logger="tta.bench"):
        assert resolve_device("auto") == torch.device("cpu")
    assert "gpus_per_node=1" in caplog.text


def test_source_images_read_while_a_method_sets_up_show_on_a_progress_bar(capsys):
    from tta.bench.source_data import CountedReads, source_reading_progress

    batches = [(torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)), torch.rand(3, 3, 8, 8)]
    options = {"source_loader": batches, "fisher_loader": None, "lr": 0.1}
    with source_reading_progress(options, "rmt", show=False):
        assert options["source_loader"] is batches  # no bar, nothing wrapped
    with source_reading_progress(options, "rmt", show=True):
        view = options["source_loader"]
        assert isinstance(view, CountedReads) and options["fisher_loader"] is None and len(view) == 2
        assert [b is a for a, b in zip(batches, view)] == [True, True]
        assert view.bar.n == 7  # images, of (images, labels) pairs and of bare batches
    assert view.bar is None and len(list(view)) == 2  # read on (RMT's replay), counted no more
    assert "rmt: source images" in capsys.readouterr().err


@needs_cifar
def test_a_method_reading_source_images_shows_its_setup(tmp_path, capsys):
    run_benchmark(compose_config(TINY + ["method=santa", "method.num_prototype_images=64", "run.progress=true",
                                         "data.corruptions=[contrast]"]), tmp_path)
    err = capsys.readouterr().err
    assert "santa: source images" in err and err.index("santa: source images") < err.index("santa: 100%")


@needs_cifar
def test_the_runner_runs_what_the_config_says_and_skips_only_the_same(tmp_path):
    # The Python API too (no Hydra overrides to read): a value equal to the Python
    # default but not the preset's is passed, recorded, and hashed apart.
    res = run_benchmark(compose_config(TINY + ["method=deyo", "method.optimizer=sgd"]), tmp_path)
    assert res["method_preset"] == "cifar10" and res["method_overrides"] == {"optimizer": "sgd"}
    assert res["config"]["method"]["optimizer"] == "sgd"
    plain = run_benchmark(compose_config(TINY + ["method=deyo"]), tmp_path)
    assert not plain.get("skipped") and plain["method_overrides"] == {}
    assert plain["config"]["method"]["optimizer"] == "adam"  # the preset's, as it ran


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------


@needs_cifar
def test_cli_single_run(tmp_path):
    _cli(CLI_TINY + ["method=norm"], tmp_path)
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    # Named after the overrides, minus those that do not change results (run.progress).
    assert [r.name for r in runs] == ["data.corruptions=[contrast],data.num_images=16,method=norm,run.batch_size=8,run.device=cpu"]
    res = json.loads((runs[0] / "results.json").read_text())
    assert REQUIRED_KEYS <= set(res) and res["method"] == "norm"
    assert "run.progress=false" in res["hydra"]["overrides"]  # as typed (sweeps re-render it)
    assert {"results.csv", "results.png", "tta-bench.log"} <= {p.name for p in runs[0].iterdir()}


@needs_cifar
def test_cli_sweep_with_joblib_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _cli(["-m", "hydra/launcher=joblib_local", "method=source,tent", f"hydra.sweep.dir={sweep}"] + CLI_TINY,
                tmp_path)
    results = sorted(sweep.rglob("results.json"))
    assert {json.loads(p.read_text())["method"] for p in results} == {"source", "tent"}
    assert "| source |" in proc.stdout and "| tent |" in proc.stdout


@pytest.mark.slow
@needs_cifar
def test_cli_sweep_with_submitit_local_launcher(tmp_path):
    # The SLURM path (hydra-submitit-launcher) for real, on this machine: each job is
    # pickled, run by `python -m submitit.core._submit` in a process of its own
    # and its result read back, as on a cluster. submitit's folder is the plugin's
    # default, ${hydra.sweep.dir}/.submitit/%j (%j: the job id, here the PID of
    # submitit's process that starts and watches the job).
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")  # in the bench extra
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", "method=source,tent", f"hydra.sweep.dir={sweep}"] + CLI_TINY

    def submitit_jobs() -> dict[int, str]:
        """Each job's id (its process) and its log (stdout and stderr)."""
        return {int(d.name): (d / f"{d.name}_0_log.out").read_text() + (d / f"{d.name}_0_log.err").read_text()
                for d in (sweep / ".submitit").iterdir() if d.name.isdigit()}

    def methods(logs) -> list[str]:
        return sorted(m for log in logs for m in ("method=source", "method=tent") if m in log)

    proc = _cli(args, tmp_path)
    results = {p.parent.name: p for p in sweep.glob("*/results.json")}
    assert {json.loads(p.read_text())["method"] for p in results.values()} == {"source", "tent"}
    assert "| source |" in proc.stdout and "| tent |" in proc.stdout and (sweep / "report.md").is_file()
    first = submitit_jobs()
    # Two processes, neither this one, each with its own log of one job.
    assert len(first) == 2 and os.getpid() not in first
    for log in first.values():
        assert "Job completed successfully" in log
    assert methods(first.values()) == ["method=source", "method=tent"]
    written = {name: p.read_bytes() for name, p in results.items()}

    # A rerun submits both jobs again; each finds its results.json and skips.
    proc = _cli(args, tmp_path)
    rerun = [log for log in submitit_jobs().values() if "skipping" in log]
    assert methods(rerun) == ["method=source", "method=tent"]
    assert all("Job completed successfully" in log for log in rerun)
    assert {name: p.read_bytes() for name, p in results.items()} == written
    for name in results:
        assert "skipping" in (sweep / name / "tta-bench.log").read_text()
    assert "| source |" in proc.stdout and "| tent |" in proc.stdout


# ----------------------------------------------------------------------------------
# A run killed mid-stream resumes from its checkpoint
# ----------------------------------------------------------------------------------

# Runs tta-bench with every adaptation step slowed down, so the test can kill it
# between checkpoints.
_SLOW_BENCH = """
import sys, time
import tta.methods.base as base
step = base.TTAMethod.forward
base.TTAMethod.forward = lambda self, x: (time.sleep(0.25), step(self, x))[1]
from tta.bench.app import main
sys.argv = ["tta-bench", *sys.argv[1:]]
main()
"""


_RESUME_ARGS = ["method=deyo", "data.corruptions=[contrast,pixelate]", "data.num_images=48", "run.batch_size=8",
                "run.device=cpu", "run.progress=false", "run.plot=false", "run.num_threads=1",
                "run.checkpoint_every=2"]


@pytest.fixture(scope="module")
def uninterrupted_deyo(tmp_path_factory) -> dict:
    """results.json of the resume tests' run, straight through on the tensor cache."""
    where = tmp_path_factory.mktemp("straight")
    _cli([*_RESUME_ARGS, "run.out_dir=straight"], where)
    (reference,) = (where / "straight").rglob("results.json")
    return json.loads(reference.read_text())


@needs_cifar
@pytest.mark.parametrize("loader", ["tensor_cache", "dataloader"])
def test_killed_run_resumes_from_checkpoint_with_the_same_numbers(tmp_path: Path, uninterrupted_deyo,
                                                                  loader: str) -> None:
    # DeYO draws random patch permutations: the RNG state must come back too, and
    # the DataLoader path (data.cache_mb=0, what sets over the cache size take)
    # must neither draw from it nor give numbers other than the tensor cache's.
    args = _RESUME_ARGS + (["data.cache_mb=0", "data.num_workers=1"] if loader == "dataloader" else [])
    env = dict(os.environ, TTA_HOME=str(tta.tta_home()), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_BENCH, *args, "run.out_dir=killed"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    position = 0
    try:
        deadline = time.monotonic() + 240
        while position < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            found = list((tmp_path / "killed").rglob("checkpoint.pt"))
            try:
                position = torch.load(found[0], weights_only=True)["position"] if found else 0
            except (FileNotFoundError, RuntimeError, EOFError):  # replaced or removed meanwhile
                continue
    finally:
        proc.kill()
        proc.wait()
    assert 4 <= position < 12, f"no checkpoint mid-stream (position {position}, rc {proc.returncode})"
    assert not list((tmp_path / "killed").rglob("results.json"))

    _cli([*args, "run.out_dir=killed"], tmp_path)
    (resumed,) = (tmp_path / "killed").rglob("results.json")
    assert not list((tmp_path / "killed").rglob("checkpoint.pt"))
    ref, res = uninterrupted_deyo, json.loads(resumed.read_text())
    assert res["loader"] == loader and ref["loader"] == "tensor_cache"
    assert res["resumed_at_batch"] >= 4 and ref["resumed_at_batch"] is None
    assert res["config_hash"] == ref["config_hash"]
    assert res["error"] == ref["error"] and res["ece"] == ref["ece"]
    for key in ("error", "loss", "num_selected"):
        assert res["steps"][key] == ref["steps"][key], key
