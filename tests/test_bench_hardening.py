"""tta.bench hardening: the loader's two paths give the same numbers (and resume to
them), bad image files are found before streaming, config values are checked when
the config is read, and the report names the results it cannot read.

Runs offline on $TTA_HOME (the shared CIFAR-10 JPEGs and ResNet-20 weights) with
streams of a few batches of 8 images; bad-file tests copy a handful of the shared
JPEGs into a temporary folder (the shared folder is never written).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("hydra")

import tta  # noqa: E402
import tta.methods.base as methods_base  # noqa: E402
from tta.bench import compose_config, make_report, run_benchmark  # noqa: E402
from tta.bench.settings import read_config  # noqa: E402
from tta.bench.sources import build_domains  # noqa: E402
from tta.bench.stream import BatchLoader, build_stream  # noqa: E402

CIFAR_TEST = tta.tta_home() / "data" / "cifar10" / "test"
needs_cifar = pytest.mark.skipif(
    not CIFAR_TEST.is_dir() or not (tta.tta_home() / "models" / "cifar10").is_dir(),
    reason="needs $TTA_HOME/data/cifar10 and $TTA_HOME/models/cifar10",
)

TINY = ["data.corruptions=[contrast,pixelate]", "data.num_images=16", "run.batch_size=8",
        "run.device=cpu", "run.progress=false", "run.plot=false", "run.num_threads=1",
        "run.skip_existing=false"]
#: The DataLoader path (sets over data.cache_mb stream through it, e.g. ImageNet-C).
DATALOADER = ["data.cache_mb=0", "data.num_workers=0"]


# ----------------------------------------------------------------------------------
# 1. Tensor cache and DataLoader give the same numbers, and resume to them
# ----------------------------------------------------------------------------------


class _Interrupted(Exception):
    """Stands in for a kill: raised from the method's forward mid-stream."""


class _Recorder:
    """Patches the methods' forward to keep every batch's logits (and, with
    ``stop_after``, to stop the run there, as a kill would)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, stop_after: int | None = None) -> None:
        self.logits: list[torch.Tensor] = []
        forward = methods_base.TTAMethod.forward

        def recording(method, x):
            if stop_after is not None and len(self.logits) >= stop_after:
                raise _Interrupted
            out = forward(method, x)
            self.logits.append(out.detach().clone())
            return out

        monkeypatch.setattr(methods_base.TTAMethod, "forward", recording)


def _deyo_run(monkeypatch, out: Path, extra: list[str], stop_after: int | None = None):
    with monkeypatch.context() as m:
        rec = _Recorder(m, stop_after)
        cfg = compose_config([*TINY, "method=deyo", "run.checkpoint_every=1", *extra])
        if stop_after is None:
            return run_benchmark(cfg, out), rec.logits
        with pytest.raises(_Interrupted):
            run_benchmark(cfg, out)
        assert (out / "checkpoint.pt").is_file() and not (out / "results.json").exists()
        return None, rec.logits


def _same_numbers(a: dict, b: dict) -> None:
    assert a["config_hash"] == b["config_hash"]
    assert a["error"] == b["error"] and a["ece"] == b["ece"]
    for key in ("error", "loss", "num_selected"):
        assert a["steps"][key] == b["steps"][key], key


@needs_cifar
def test_loader_paths_do_not_touch_the_global_rng() -> None:
    cfg = read_config(compose_config(TINY))
    domains, _ = build_domains(cfg.data, cfg.scenario, seed=0)
    stream = build_stream(domains, cfg.scenario, 8, 0)
    for loader in (BatchLoader(stream, torch.device("cpu"), seed=0),
                   BatchLoader(stream, torch.device("cpu"), cache_mb=0, num_workers=0, seed=0),
                   BatchLoader(stream, torch.device("cpu"), cache_mb=0, num_workers=1, seed=0)):
        loader.prepare()
        torch.manual_seed(123)
        before = torch.get_rng_state()
        batches = list(loader.iter_from(1))
        assert len(batches) == len(loader) - 1
        assert torch.equal(torch.get_rng_state(), before), f"cached={loader.cached} moved the global RNG"


@needs_cifar
def test_deyo_gives_the_same_numbers_on_both_loader_paths_and_after_resume(tmp_path, monkeypatch) -> None:
    ref, ref_logits = _deyo_run(monkeypatch, tmp_path / "cache", [])
    assert ref["loader"] == "tensor_cache" and len(ref_logits) == 4
    streamed, streamed_logits = _deyo_run(monkeypatch, tmp_path / "dataloader", DATALOADER)
    assert streamed["loader"] == "dataloader"
    _same_numbers(streamed, ref)
    # Per batch: the same logits, not only the same error counts.
    assert all(torch.equal(p, q) for p, q in zip(streamed_logits, ref_logits))

    # Stopped after two batches (checkpoints every batch), then started again: on
    # either path (and across paths: data.cache_mb does not change the config
    # hash) the resumed run ends with the uninterrupted numbers.
    for name, first, second in (("cache", [], []), ("dataloader", DATALOADER, DATALOADER),
                                ("cache_then_dataloader", [], DATALOADER)):
        out = tmp_path / f"resume_{name}"
        _, head = _deyo_run(monkeypatch, out, first, stop_after=2)
        res, tail = _deyo_run(monkeypatch, out, second)
        assert res["resumed_at_batch"] == 2, name
        _same_numbers(res, ref)
        assert all(torch.equal(p, q) for p, q in zip(head + tail, ref_logits)), name


@needs_cifar
def test_a_checkpoint_or_results_of_another_config_say_which_keys_changed(tmp_path, monkeypatch, caplog) -> None:
    # Before, both only said "a different config": the user had to diff configs by
    # hand to learn why a long run started over (a runtime option such as
    # method.check_inputs counts too).
    out = tmp_path / "run"
    _deyo_run(monkeypatch, out, [], stop_after=2)
    with caplog.at_level("INFO", logger="tta.bench"):
        res, _ = _deyo_run(monkeypatch, out, ["method.lr=0.002", "method.check_inputs=false"])
    assert res["resumed_at_batch"] is None
    said = [r.getMessage() for r in caplog.records if "checkpoint.pt" in r.getMessage()]
    assert len(said) == 1 and "different config (method.check_inputs=false (was true), " \
                               "method.lr=0.002 (was 0.001)); starting" in said[0], said
    caplog.clear()
    with caplog.at_level("INFO", logger="tta.bench"):
        _deyo_run(monkeypatch, out, ["method.lr=0.002", "run.seed=3", "run.skip_existing=true"])
    said = "holds results of another config (method.check_inputs=true (was false), run.seed=3 (was 0))"
    assert any(said in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


@needs_cifar
def test_results_and_checkpoints_of_other_code_are_reused_with_a_warning_naming_it(tmp_path, monkeypatch, caplog):
    # The config hash is of the config alone: a rerun after a fix in tta or a new
    # torch reused old results (or resumed an old checkpoint) without a word, and a
    # sweep mixed the numbers of two codes.
    from tta.bench.results import git_info, versions

    out = tmp_path / "run"
    _deyo_run(monkeypatch, out, [], stop_after=2)
    ckpt = out / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["versions"] == versions() and state["git"] == git_info()
    state["versions"]["torch"], state["git"]["hash"] = "0.0.1", "0" * 40
    torch.save(state, ckpt)
    with caplog.at_level("INFO", logger="tta.bench"):
        res, _ = _deyo_run(monkeypatch, out, [])
    assert res["resumed_at_batch"] == 2
    said = [r for r in caplog.records if "written by other code" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING"
    assert f"torch 0.0.1 (now {versions()['torch']})" in said[0].getMessage()
    if git_info()["hash"]:
        assert f"tta commit 000000000000 (now {git_info()['hash'][:12]})" in said[0].getMessage()

    caplog.clear()
    with caplog.at_level("INFO", logger="tta.bench"):
        again = run_benchmark(compose_config([*TINY, "method=deyo", "run.skip_existing=true"]), out)
    assert again["skipped"] and not [r for r in caplog.records if r.levelname == "WARNING"]
    results = json.loads((out / "results.json").read_text())
    results["versions"]["numpy"] = "0.0.1"
    (out / "results.json").write_text(json.dumps(results))
    caplog.clear()
    with caplog.at_level("INFO", logger="tta.bench"):
        again = run_benchmark(compose_config([*TINY, "method=deyo", "run.skip_existing=true"]), out)
    assert again["skipped"] and again["error"] == res["error"]
    said = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 1 and f"made by other code (numpy 0.0.1 (now {versions()['numpy']})); delete it or set " \
                               "run.skip_existing=false" in said[0].getMessage(), said


# ----------------------------------------------------------------------------------
# 2. Bad image files: refused before streaming (every path named), or skipped
# ----------------------------------------------------------------------------------

#: Each kind of bad file, and what the refusal says about it.
BAD_KINDS = {
    "not_an_image": "not an image",
    "empty": "empty (0 bytes)",
    "truncated_jpeg": "truncated JPEG",
    "truncated_png": "truncated PNG",
    "folder": "is a directory",
    "broken_symlink": "broken symlink",
}


def _copy_cifar_like(root: Path, per_class: int = 2) -> list[Path]:
    """An ImageFolder laid out like $TTA_HOME/data/cifar10/test (10 class folders
    of JPEGs), with ``per_class`` of the shared images copied into each."""
    copied = []
    for cls in sorted(p.name for p in CIFAR_TEST.iterdir() if p.is_dir()):
        (root / cls).mkdir(parents=True)
        for f in sorted((CIFAR_TEST / cls).glob("*.jpg"))[:per_class]:
            copied.append(Path(shutil.copy(f, root / cls / f.name)))
    return copied


def _make_bad(path: Path, kind: str, good_jpeg: Path) -> Path:
    from PIL import Image

    data = good_jpeg.read_bytes()
    if kind == "not_an_image":
        path.write_text("class,label\ncat,3\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated_jpeg":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_png":
        path = path.with_suffix(".png")
        Image.open(good_jpeg).save(path)
        png = path.read_bytes()
        path.write_bytes(png[: len(png) // 2])
    elif kind == "folder":
        path.mkdir()
    elif kind == "broken_symlink":
        path.symlink_to(path.parent / "gone.jpg")
    return path


@pytest.fixture
def folder_with_bad_files(tmp_path) -> tuple[Path, list[Path], list[Path]]:
    root = tmp_path / "cifar10" / "test"
    good = _copy_cifar_like(root)
    bad = [_make_bad(root / ("cat", "dog", "frog")[i % 3] / f"bad_{kind}.jpg", kind, good[i])
           for i, kind in enumerate(BAD_KINDS)]
    return root, good, bad


@needs_cifar
@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_check_image_file_names_each_kind_of_bad_file(tmp_path, kind) -> None:
    from tta.bench.files import check_image_file

    good = Path(shutil.copy(sorted(CIFAR_TEST.glob("*/*.jpg"))[0], tmp_path / "good.jpg"))
    assert check_image_file(good) is None
    bad = _make_bad(tmp_path / "bad.jpg", kind, good)
    assert BAD_KINDS[kind] in (check_image_file(bad) or "")


@needs_cifar
def test_check_image_file_accepts_padding_and_other_formats(tmp_path) -> None:
    from PIL import Image

    from tta.bench.files import check_image_file

    good = Path(shutil.copy(sorted(CIFAR_TEST.glob("*/*.jpg"))[0], tmp_path / "good.jpg"))
    padded, trailer = tmp_path / "padded.jpg", tmp_path / "trailer.jpg"
    padded.write_bytes(good.read_bytes() + b"\x00" * 300)
    trailer.write_bytes(good.read_bytes() + b"SEFH camera metadata after the end marker")
    png, bmp = tmp_path / "a.png", tmp_path / "a.bmp"
    Image.open(good).save(png)
    Image.open(good).save(bmp)
    assert [check_image_file(p) for p in (padded, trailer, png, bmp)] == [None] * 4
    bmp.write_bytes(bmp.read_bytes()[:-100])
    assert "truncated BMP" in check_image_file(bmp)


def test_every_image_mode_decodes_to_its_8bit_rgb(tmp_path) -> None:
    """Greyscale, palette, alpha, CMYK and 16-bit files decode to the 8-bit RGB a
    viewer shows, in both readers (tta-bench's and ``load_image_folder``): Pillow's
    own ``convert("RGB")`` turns a 16-bit greyscale PNG white."""
    from PIL import Image

    from tta.bench.files import decode_image
    from tta.data import load_image_folder

    rng = np.random.default_rng(0)
    rgb = (rng.random((12, 10, 3)) * 255).astype(np.uint8)
    grey = rgb[..., 0]
    folder = tmp_path / "images" / "only_class"
    folder.mkdir(parents=True)
    cases = {
        "rgb.png": (Image.fromarray(rgb), rgb),
        "grey.png": (Image.fromarray(grey), np.repeat(grey[..., None], 3, 2)),
        "grey16.png": (Image.fromarray(grey.astype(np.uint16) * 256 + 255), np.repeat(grey[..., None], 3, 2)),
        "rgba.png": (Image.fromarray(rgb).convert("RGBA"), rgb),
        "palette.png": (Image.fromarray(rgb).convert("P"), np.asarray(Image.fromarray(rgb).convert("P").convert("RGB"))),
    }
    for name, (img, _) in cases.items():
        img.save(folder / name)
    assert Image.open(folder / "grey16.png").mode.startswith("I;16")
    for name, (_, want) in cases.items():
        assert np.array_equal(decode_image(folder / name).permute(1, 2, 0).numpy(), want), name
    images, _ = load_image_folder(tmp_path / "images", shuffle=False, uint8=True)
    for got, (_, want) in zip(images, (cases[n] for n in sorted(cases))):
        assert np.array_equal(got.permute(1, 2, 0).numpy(), want)


@needs_cifar
def test_bad_files_refuse_the_run_before_streaming_naming_every_one(folder_with_bad_files, tmp_path,
                                                                    monkeypatch) -> None:
    from tta.bench.files import ImageFileError

    root, _, bad = folder_with_bad_files
    steps = []
    monkeypatch.setattr(methods_base.TTAMethod, "forward", lambda self, x: steps.append(1))
    for loader in ([], DATALOADER):
        cfg = compose_config([*TINY, "method=source", f"data.root={root}", "data.num_images=null", *loader])
        with pytest.raises(ImageFileError) as err:
            run_benchmark(cfg, tmp_path / "out")
        message = str(err.value)
        for path, kind in zip(bad, BAD_KINDS):
            assert f"{path}: " in message and BAD_KINDS[kind] in message, kind
        assert "data.skip_bad_files=true" in message
    assert steps == [] and not (tmp_path / "out").exists()


@needs_cifar
def test_skip_bad_files_leaves_them_out_and_counts_them(folder_with_bad_files, tmp_path) -> None:
    root, good, bad = folder_with_bad_files
    base = [*TINY, "method=source", f"data.root={root}", "data.skip_bad_files=true"]
    res = run_benchmark(compose_config([*base, "data.num_images=null"]), tmp_path / "all")
    assert res["num_bad_files"] == len(bad) and res["num_images"] == 2 * len(good)
    assert sorted(b["path"] for b in res["bad_files"]) == sorted(map(str, bad))
    saved = json.loads((tmp_path / "all" / "results.json").read_text())
    assert saved["num_bad_files"] == len(bad) and len(saved["bad_files"]) == len(bad)
    # A subset keeps its size: bad files are replaced by the next ones of the seeded order.
    res = run_benchmark(compose_config([*base, f"data.num_images={len(good)}"]), tmp_path / "subset")
    assert res["num_images"] == 2 * len(good) and res["num_bad_files"] >= 1
    # Results that left files out are not reused by a run that refuses bad files.
    from tta.bench.files import ImageFileError

    with pytest.raises(ImageFileError):
        run_benchmark(compose_config([*TINY, "method=source", f"data.root={root}", "data.num_images=null",
                                      "run.skip_existing=true"]), tmp_path / "all")


@needs_cifar
def test_bad_files_of_every_imagenet_c_domain_and_of_the_source_images_are_named(tmp_path) -> None:
    from tta.bench.files import ImageFileError
    from tta.bench.source_data import load_source_images

    root = tmp_path / "ImageNet-C"
    bad = []
    for i, corruption in enumerate(("fog", "contrast")):
        folder = root / corruption / "5" / "n01440764"
        folder.mkdir(parents=True)
        for f in sorted(CIFAR_TEST.glob("airplane/*.jpg"))[:3]:
            shutil.copy(f, folder / f.name)
        bad.append(_make_bad(folder / "x.JPEG", ("empty", "truncated_jpeg")[i], folder / f.name))
    cfg = read_config(compose_config(["data=imagenetc", f"data.root={root}", "data.corruptions=[fog,contrast]",
                                      "data.num_images=null"]))
    with pytest.raises(ImageFileError) as err:
        build_domains(cfg.data, cfg.scenario)
    assert all(str(p) in str(err.value) for p in bad)
    domains, _ = build_domains(replace(cfg.data, skip_bad_files=True), cfg.scenario)
    assert [len(d) for d in domains] == [3, 3] and [d.pool.bad_files[0][0] for d in domains] == list(map(str, bad))

    with pytest.raises(ImageFileError, match="data.source_root"):
        load_source_images(root / "fog" / "5", 10, size=32)
    left_out: list = []
    images = load_source_images(root / "fog" / "5", 10, size=32, skip_bad_files=True, bad_files=left_out)
    assert images.shape == (3, 3, 32, 32) and [p for p, _ in left_out] == [str(bad[0])]


@needs_cifar
@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_file_that_fails_to_decode_mid_stream_is_named(tmp_path, num_workers) -> None:
    root = tmp_path / "test"
    good = _copy_cifar_like(root, per_class=1)
    cfg = read_config(compose_config([*TINY, f"data.root={root}", "data.num_images=null"]))
    domains, _ = build_domains(cfg.data, cfg.scenario, seed=0)  # every file passes the check
    stream = build_stream(domains, cfg.scenario, 4, 0)
    # Cut short after the check (e.g. rewritten meanwhile): Pillow's own error,
    # "Truncated File Read", names no file.
    victim = good[4]
    victim.write_bytes(victim.read_bytes()[:400])
    for loader in (BatchLoader(stream, torch.device("cpu")),
                   BatchLoader(stream, torch.device("cpu"), cache_mb=0, num_workers=num_workers)):
        with pytest.raises(OSError, match=re.escape(str(victim))):
            loader.prepare()
            list(loader)


# ----------------------------------------------------------------------------------
# 3. Config values are checked when the config is read
# ----------------------------------------------------------------------------------

#: Bad override -> what the refusal must say (the key's full name and what it takes).
BAD_VALUES = {
    "run.ece_bins=0": "run.ece_bins must be an integer >= 1; got 0",
    "run.ece_bins=2.5": "run.ece_bins must be an integer >= 1; got 2.5",
    "data.severity=2.7": "data.severity must be an integer in 1..5; got 2.7",
    "data.severity=6": "data.severity must be an integer in 1..5; got 6",
    "data.severity=five": "data.severity must be an integer in 1..5; got 'five'",
    "data.num_images=2.5": "data.num_images must be null or an integer >= 1; got 2.5",
    "data.num_images=0": "data.num_images must be null or an integer >= 1; got 0",
    "run.seed=-3": "run.seed must be an integer in 0..2**63-1; got -3",
    "run.seed=1.5": "run.seed must be an integer in 0..2**63-1; got 1.5",
    "run.batch_size=0": "run.batch_size must be an integer >= 1; got 0",
    "run.batch_size=2.5": "run.batch_size must be an integer >= 1; got 2.5",
    "run.num_threads=0": "run.num_threads must be null or an integer >= 1; got 0",
    "run.checkpoint_every=-2": "run.checkpoint_every must be null or an integer >= 0; got -2",
    "run.checkpoint_minutes=-1": "run.checkpoint_minutes must be null or a finite number >= 0; got -1",
    "run.ece=maybe": "run.ece must be true or false; got 'maybe'",
    "run.device=gpu": "run.device must be auto or a torch device",
    "data.cache_mb=-1": "data.cache_mb must be a number >= 0; got -1",
    "data.num_workers=-1": "data.num_workers must be an integer >= 0; got -1",
    "data.crop_ratio=0": "data.crop_ratio must be a finite number in (0, 1]; got 0",
    "data.crop_ratio=1.5": "data.crop_ratio must be a finite number in (0, 1]; got 1.5",
    "data.image_size=31.5": "data.image_size must be null or an integer >= 1; got 31.5",
    "data.preset=cifar100": "data.preset must be null or one of cifar, tinyimagenet, imagenet; got 'cifar100'",
    "data.skip_bad_files=yes": "data.skip_bad_files must be true or false; got 'yes'",
    "scenario.severities=[1,7]": "scenario.severities must be null or a non-empty list of integers in 1..5; got [1, 7]",
    "scenario.label_shift_gamma=0": "scenario.label_shift_gamma must be null or a finite number > 0; got 0",
    "scenario.label_shift_slots=0": "scenario.label_shift_slots must be null or an integer >= 1; got 0",
}


@pytest.mark.parametrize("override", list(BAD_VALUES))
def test_bad_config_values_are_refused_when_the_config_is_read(tmp_path, override) -> None:
    from tta.bench.settings import ConfigError

    with pytest.raises(ConfigError) as err:
        run_benchmark(compose_config([*TINY, override]), tmp_path / "out")
    assert BAD_VALUES[override] in str(err.value)
    assert not (tmp_path / "out").exists()


def test_every_bad_value_is_listed_at_once_and_the_shipped_configs_pass(tmp_path) -> None:
    from tta.bench.config import config_dir
    from tta.bench.settings import ConfigError

    with pytest.raises(ConfigError) as err:
        read_config(compose_config(["run.ece_bins=0", "data.severity=2.7", "run.seed=-3"]))
    assert all(key in str(err.value) for key in ("run.ece_bins", "data.severity", "run.seed"))
    for group in ("data", "scenario", "model"):
        for path in sorted((config_dir() / group).glob("*.yaml")):
            read_config(compose_config([f"{group}={path.stem}", "data.root=/x"]))
    # Edge values that are fine: no cache limit, checkpoints off, all images.
    read_config(compose_config(["data.cache_mb=inf", "run.checkpoint_every=0", "data.num_images=null",
                                    "run.checkpoint_minutes=null", "run.num_threads=2"]))
    read_config(compose_config(["data.cache_mb=0.5", "scenario.severities=[1,5]", "run.device=cuda:1"]))


def test_missing_and_unknown_keys_are_named_when_the_config_is_read() -> None:
    from omegaconf import OmegaConf

    from tta.bench.settings import ConfigError

    plain = OmegaConf.to_container(compose_config(["data.root=/x"]), resolve=True)
    del plain["data"]["cache_mb"]
    plain["run"]["batchsize"] = 8
    with pytest.raises(ConfigError) as err:
        read_config(plain)
    assert "data.cache_mb is missing" in str(err.value)
    # named as tta-bench's check of the command line names it (test_bench_user)
    assert "run.batchsize is not a key of run (did you mean run.batch_size? keys: batch_size," in str(err.value)
    # Typed values: lists become tuples, and every group is a frozen dataclass.
    cfg = read_config(compose_config(["data.corruptions=[fog,contrast]"]))
    assert cfg.data.corruptions == ("fog", "contrast") and cfg.run.batch_size == 64
    with pytest.raises(AttributeError):
        cfg.run.batch_size = 1  # type: ignore[misc]


# ----------------------------------------------------------------------------------
# 4. The report names the results.json it cannot read, and reports the others
# ----------------------------------------------------------------------------------


def _fake_result(method: str, error: float) -> dict:
    return {"method": method, "model": "cifar10_resnet20", "data": "cifar10c", "scenario": "continual",
            "error": {"fog": error}, "mean_error": error, "images_per_s": 100.0, "batch_size": 8,
            "domains": [{"name": "fog", "num_images": 16}], "hydra": {"job_num": None,
                                                                      "overrides": [f"method={method}"]}}


@pytest.fixture
def sweep_with_unreadable_results(tmp_path) -> tuple[Path, list[Path]]:
    sweep = tmp_path / "multirun"
    for method, error in (("source", 50.0), ("tent", 40.0)):
        (sweep / f"method={method}").mkdir(parents=True)
        (sweep / f"method={method}" / "results.json").write_text(json.dumps(_fake_result(method, error)))
    cut = sweep / "method=norm" / "results.json"  # damaged (e.g. a disk that filled up)
    foreign = sweep / "method=eata" / "results.json"  # JSON, but not a tta-bench result
    for path in (cut, foreign):
        path.parent.mkdir()
    cut.write_text(json.dumps(_fake_result("norm", 45.0))[:90])
    foreign.write_text(json.dumps({"method": "eata", "note": "copied from elsewhere"}))
    return sweep, [cut, foreign]


def test_report_warns_about_unreadable_results_and_reports_the_others(sweep_with_unreadable_results,
                                                                      caplog) -> None:
    from tta.bench.report import collect_results

    sweep, bad = sweep_with_unreadable_results
    with caplog.at_level("WARNING", logger="tta.bench.report"):
        text = make_report(sweep, plot=False)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2
    for path, reason in zip(bad, ("not valid JSON", "not a tta-bench result")):
        assert any(str(path) in w and reason in w for w in warned), path
        assert str(path) in text  # the report itself lists what it left out
    assert "| source | 50.0 |" in text and "| tent | 40.0 |" in text
    assert "| norm" not in text and "| eata" not in text
    unreadable: list = []
    assert [r["method"] for r in collect_results(sweep, unreadable=unreadable)] == ["source", "tent"]
    assert sorted(p for p, _ in unreadable) == sorted(map(str, bad))


def test_report_command_names_unreadable_results_on_stderr(sweep_with_unreadable_results) -> None:
    import os
    import subprocess
    import sys

    sweep, bad = sweep_with_unreadable_results
    proc = subprocess.run([sys.executable, "-c", "import sys; from tta.bench.report import main; sys.exit(main())",
                           str(sweep), "--no-plot"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert proc.returncode == 0, proc.stderr
    assert all(f"WARNING: leaving {p} out of the report" in proc.stderr for p in bad)
    assert "| source |" in proc.stdout and "| tent |" in proc.stdout
    # Nothing readable at all: the error names what was left out.
    for method in ("source", "tent"):
        (sweep / f"method={method}" / "results.json").write_text("{")
    with pytest.raises(FileNotFoundError, match="no readable results.json"):
        make_report(sweep, plot=False)


def test_report_header_holds_only_what_every_job_shares(tmp_path) -> None:
    # A sweep over severities and image counts, and over scenarios that set the batch
    # size: the header showed the first job's severity, image count and no batch sizes.
    sweep = tmp_path / "multirun"
    for i, (sev, n, bs, scenario) in enumerate(((3, 8, 8, "continual"), (5, 12, 1, "batch_size_1"))):
        res = _fake_result("tent", 40.0 + i)
        res.update(batch_size=bs, scenario=scenario, config={"data": {"severity": sev}},
                   domains=[{"name": "fog", "num_images": n}])
        res["hydra"]["overrides"] = ["method=tent", f"data.severity={sev}", f"data.num_images={n}",
                                     f"scenario={scenario}"]
        (sweep / str(i)).mkdir(parents=True)
        (sweep / str(i) / "results.json").write_text(json.dumps(res))
    text = make_report(sweep, plot=False)
    header = text.splitlines()[4]
    assert "severity" not in header and "images per domain: per job" in header
    table = text[text.index("| method"):]
    assert "| data.severity |" in table and "| batch_size |" in table and "| 5 | 12 | batch_size_1 | 1 |" in table
    same = make_report(sweep / "0", plot=False)  # one job: its own settings
    assert "(severity 3)" in same and "images per domain: 8" in same


def test_report_header_shows_the_severity_the_domains_ran_at(tmp_path) -> None:
    # scenario.severities=[1] runs every domain at severity 1 and names it "fog" (one
    # severity), while data.severity stays 5: the header said "(severity 5)".
    sweep = tmp_path / "multirun"
    res = _fake_result("tent", 40.0)
    res.update(config={"data": {"severity": 5}, "scenario": {"severities": [1]}},
               domains=[{"name": "fog", "corruption": "fog", "severity": 1, "num_images": 16}])
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "results.json").write_text(json.dumps(res))
    header = make_report(sweep, plot=False).splitlines()[4]
    assert "(severity 1)" in header, header


def test_report_header_does_not_give_the_first_domain_size_for_all(tmp_path) -> None:
    # gradual visits severities 1-4 twice and 5 once: its domains hold 2N and N
    # images, and the header gave the first domain's 2N as every domain's size.
    sweep = tmp_path / "multirun"
    res = _fake_result("tent", 40.0)
    res.update(scenario="gradual", error={"fog/1": 40.0, "fog/5": 60.0},
               domains=[{"name": "fog/1", "num_images": 6}, {"name": "fog/5", "num_images": 3}])
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "results.json").write_text(json.dumps(res))
    header = make_report(sweep, plot=False).splitlines()[4]
    assert "images per domain: 6" not in header and "images per domain: per domain" in header, header


def test_report_out_naming_a_folder_fails_clearly_and_writes_nothing(tmp_path, capsys) -> None:
    # --out <folder>: a traceback (the rename onto the folder) after report.png was
    # written as <folder>.png beside it.
    from tta.bench.report import main

    sweep = tmp_path / "multirun"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "results.json").write_text(json.dumps(_fake_result("tent", 40.0)))
    (tmp_path / "out").mkdir()
    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 2
    assert "is a folder: give --out a file name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multirun", "out"]


def test_report_plot_format_follows_its_name_and_unfinished_jobs_are_listed(tmp_path, capsys) -> None:
    # --plot p.svg held PNG bytes; job folders without results (running, or killed
    # before the end) were left out of the report without a word.
    from tta.bench.report import main

    sweep = tmp_path / "multirun"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "results.json").write_text(json.dumps(_fake_result("tent", 40.0)))
    for job in ("1", "2"):
        (sweep / job / ".hydra").mkdir(parents=True)
    (sweep / "2" / "checkpoint.pt").write_bytes(b"")
    text = make_report(sweep, out_png=tmp_path / "p.svg")
    assert (tmp_path / "p.svg").read_bytes().lstrip().startswith(b"<?xml")
    assert "without results yet, running or stopped (2;" in text
    assert f"- `{sweep / '1'}`\n" in text and f"- `{sweep / '2'}` (a checkpoint)\n" in text
    assert main([str(sweep), "--plot", str(tmp_path / "p.xyz")]) == 2
    assert "matplotlib writes" in capsys.readouterr().err and not (tmp_path / "p.xyz").exists()
    (sweep / "0" / "results.json").unlink()
    with pytest.raises(FileNotFoundError, match="2 job folders have none yet"):
        make_report(sweep)


def test_report_of_a_file_says_it_is_a_file(tmp_path) -> None:
    # tta-bench-report <job>/results.json said "sweep folder not found" of a file that is there.
    res = tmp_path / "job" / "results.json"
    res.parent.mkdir()
    res.write_text(json.dumps(_fake_result("tent", 40.0)))
    with pytest.raises(FileNotFoundError, match=r"is a file, not a sweep folder.*e\.g\. .*job"):
        make_report(res, plot=False)


def test_report_rows_left_at_a_default_show_the_value_they_ran_with(tmp_path) -> None:
    # Two sweeps in one folder, one with run.seed=1: the other's rows showed "–" for
    # the seed 0 they ran with, and run.seed=0 given or left at its default made a
    # column of "0" and "–" for one and the same seed.
    sweep = tmp_path / "multirun"
    for i, (seed, given) in enumerate(((0, False), (1, True), (0, True))):
        res = _fake_result("tent", 40.0 + i)
        res["config"] = {"run": {"seed": seed}, "data": {"corruptions": ["fog"]}}
        res["hydra"].update(job_num=i, overrides=["method=tent"] + [f"run.seed={seed}"] * given)
        (sweep / str(i)).mkdir(parents=True)
        (sweep / str(i) / "results.json").write_text(json.dumps(res))
    table = make_report(sweep, plot=False)
    assert "| tent | 0 | 40.0 |" in table and "| tent | 1 | 41.0 |" in table and "| tent | 0 | 42.0 |" in table
    both_zero = make_report(sweep, plot=False, only=[frozenset({"method=tent"}), frozenset({"method=tent",
                                                                                           "run.seed=0"})])
    assert "run.seed" not in both_zero


def test_fisher_batches_take_the_run_batch_size(monkeypatch) -> None:
    # EATA's Fisher is the squared gradient of a batch's mean loss, so its size
    # depends on the batch: the official code batches it as its test stream (64 on
    # ImageNet), the port too (cfgs/cifar10_c: 200). Batch size 1 falls back to 64.
    from types import SimpleNamespace

    import tta.bench.runner as runner

    monkeypatch.setattr(runner, "load_source_images",
                        lambda *a, **k: torch.zeros(450, 3, 8, 8, dtype=torch.uint8))
    data = SimpleNamespace(source_root="src", image_size=None, crop_ratio=1.0, num_workers=0,
                           skip_bad_files=False)
    job = SimpleNamespace(device=torch.device("cpu"), input_size=None)
    sizes = [len(b) for b in runner._fisher_batches(data, "eata", 450, job, 0, [], 200)]
    assert sizes == [200, 200, 50]
    sizes = [len(b) for b in runner._fisher_batches(data, "eata", 450, job, 0, [], 1)]
    assert sizes == [64] * 7 + [2]
