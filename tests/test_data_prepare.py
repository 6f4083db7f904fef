"""tta-data (tta.data.prepare): CIFAR-10 from the python archive to PNG files, the
CIFAR-10-C and ImageNet-C layout and checksum checks. Offline, on small fakes
written here (the real files' checksums cannot match them, which the checksum
tests use)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tta.data import ImageFileError, imagenet_wnids
from tta.corruptions import EXTRA_NAMES, NAMES
from tta.data import cifar10, cifar10_archive, cifar10c, list_image_folder
from tta.data import prepare as P

CLASSES = P.CIFAR10_CLASSES


# ----------------------------------------------------------------------------------
# A fake CIFAR-10 python archive
# ----------------------------------------------------------------------------------


def _batch_bytes(images: np.ndarray, labels: list[int], name: str) -> bytes:
    """A batch file like the published ones: a pickled dict with bytes keys, 'data'
    (N, 3072) uint8 holding the R, G, B planes of each 32x32 image row-major."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    batch = {
        b"batch_label": name.encode(),
        b"labels": list(labels),
        b"data": np.ascontiguousarray(data),
        b"filenames": [f"img_{name}_{i}.png".encode() for i in range(len(images))],
    }
    return pickle.dumps(batch, protocol=2)


def write_fake_cifar10(folder: Path, per_batch: int = 7, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``<folder>/cifar-10-batches-py`` with 5 train batches, test_batch and
    batches.meta; returns ``{split: (images (N, 32, 32, 3), labels (N,))}``."""
    rng = np.random.default_rng(seed)
    out = folder / P.CIFAR10_FOLDER_NAME
    out.mkdir(parents=True)
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (out / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    splits: dict[str, list] = {"train": [], "test": []}
    for split, names in P.CIFAR10_SPLIT_FILES.items():
        for name in names:
            images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, 10, per_batch)]
            (out / name).write_bytes(_batch_bytes(images, labels, name))
            splits[split].append((images, np.array(labels)))
    return {s: (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
            for s, parts in splits.items()}


def tar_folder(folder: Path, tar_path: Path, mode: str = "w:gz") -> Path:
    with tarfile.open(tar_path, mode) as tar:
        tar.add(folder, arcname=folder.name)
    return tar_path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """(batches folder, .tar.gz of it, the original images and labels per split)."""
    base = tmp_path_factory.mktemp("cifar_src")
    truth = write_fake_cifar10(base)
    folder = base / P.CIFAR10_FOLDER_NAME
    tgz = tar_folder(folder, base / P.CIFAR10_TAR_NAME)
    return folder, tgz, truth


@pytest.fixture
def published_fake(monkeypatch, fake):
    """Make the fake the 'published' archive: its md5s become the expected ones."""
    folder, tgz, _ = fake
    monkeypatch.setattr(cifar10_archive, "CIFAR10_TAR_MD5", md5(tgz))
    monkeypatch.setattr(cifar10_archive, "CIFAR10_FILE_MD5", {n: md5(folder / n) for n in P.CIFAR10_FILE_MD5})


def quiet(*_a):
    pass


def read_split(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[Path]]:
    files, labels, classes = list_image_folder(folder)
    images = np.stack([np.asarray(Image.open(f)) for f in files])
    return images, np.array(labels), classes, files


def expected_order(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The source images in ImageFolder order: by class, then source order within it."""
    order = np.concatenate([np.flatnonzero(labels == c) for c in range(10)])
    return images[order], labels[order]


def check_written(targets: dict[str, Path], truth, splits=("train", "test")) -> None:
    for split in splits:
        got, got_labels, classes, files = read_split(targets[split])
        assert classes == list(CLASSES)
        want, want_labels = expected_order(*truth[split])
        assert got.dtype == np.uint8 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)  # lossless, exact pixels
        np.testing.assert_array_equal(got_labels, want_labels)
        assert all(f.suffix == ".png" for f in files)
        first = sorted((targets[split] / CLASSES[want_labels[0]]).iterdir())[0]
        assert first.name == "0000.png"


# ----------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------


def test_cifar10_from_folder_and_tarball_give_the_exact_images(tmp_path, fake):
    folder, tgz, truth = fake
    a = P.prepare_cifar10(tmp_path / "a", source=folder, verify=False, log=quiet, progress=False)
    assert a == {s: (tmp_path / "a" / "data" / "cifar10" / s) for s in ("train", "test")}
    check_written(a, truth)
    # the download-style parent folder (holding cifar-10-batches-py) works too
    b = P.prepare_cifar10(tmp_path / "b", source=folder.parent, splits="test", verify=False,
                          log=quiet, progress=False, workers=1)
    assert list(b) == ["test"] and not (tmp_path / "b" / "data" / "cifar10" / "train").exists()
    c = P.prepare_cifar10(tmp_path / "c", source=tgz, splits="both", verify=False, log=quiet,
                          progress=False, workers=2)
    check_written(c, truth)
    # nothing but the split folders is left beside them
    assert sorted(p.name for p in (tmp_path / "c" / "data" / "cifar10").iterdir()) == ["test", "train"]


def test_cifar10_checksums_refused_and_overridden(tmp_path, fake, capsys):
    folder, tgz, truth = fake
    with pytest.raises(P.ChecksumError) as err:
        P.prepare_cifar10(tmp_path, source=tgz, log=quiet, progress=False)
    msg = str(err.value)
    assert str(tgz) in msg and P.CIFAR10_TAR_MD5 in msg and md5(tgz) in msg and "--no-verify" in msg
    with pytest.raises(P.ChecksumError) as err:
        P.prepare_cifar10(tmp_path, source=folder, splits="test", log=quiet, progress=False)
    msg = str(err.value)
    assert "batches.meta" in msg and P.CIFAR10_FILE_MD5["batches.meta"] in msg and "--no-verify" in msg
    assert not (tmp_path / "data" / "cifar10" / "test").exists()
    # the command line: refused (exit 1, the reason on stderr), then --no-verify
    assert P.main(["cifar10", "--root", str(tmp_path), "--source", str(folder), "--quiet"]) == 1
    assert "does not match the published md5" in capsys.readouterr().err
    assert P.main(["cifar10", "--root", str(tmp_path), "--source", str(folder), "--no-verify",
                   "--split", "test", "--quiet"]) == 0
    out = capsys.readouterr().out
    test_dir = tmp_path / "data" / "cifar10" / "test"
    assert f"export TTA_HOME={tmp_path}" in out and f"data.root={test_dir}" in out
    assert "data.source_root" not in out
    check_written({"test": test_dir}, truth, splits=("test",))


def test_cifar10_verified_when_the_checksums_match(tmp_path, fake, published_fake):
    folder, tgz, truth = fake
    check_written(P.prepare_cifar10(tmp_path / "a", source=tgz, log=quiet, progress=False), truth)
    check_written(P.prepare_cifar10(tmp_path / "b", source=folder, log=quiet, progress=False), truth)
    # one byte changed in one batch file: refused, naming that file
    bad = tmp_path / "bad" / P.CIFAR10_FOLDER_NAME
    bad.mkdir(parents=True)
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    raw = bytearray((bad / "data_batch_3").read_bytes())
    raw[-100] ^= 1
    (bad / "data_batch_3").write_bytes(bytes(raw))
    with pytest.raises(P.ChecksumError, match="data_batch_3"):
        P.prepare_cifar10(tmp_path / "c", source=bad, log=quiet, progress=False)


def test_cifar10_idempotent(tmp_path, fake, monkeypatch):
    folder, _, _ = fake
    targets = P.prepare_cifar10(tmp_path, source=folder, verify=False, log=quiet, progress=False)
    stamp = {p: p.stat().st_mtime_ns for t in targets.values() for p in t.rglob("*.png")}
    messages = []

    def no_download(*_a, **_k):
        raise AssertionError("a complete copy must not be downloaded again")

    monkeypatch.setattr(cifar10, "_download_cifar10", no_download)
    assert P.prepare_cifar10(tmp_path, log=messages.append, progress=False) == targets
    assert sum("already holds a complete CIFAR-10" in m for m in messages) == 2
    assert {p: p.stat().st_mtime_ns for t in targets.values() for p in t.rglob("*.png")} == stamp
    # --force rewrites
    P.prepare_cifar10(tmp_path, source=folder, splits="test", verify=False, force=True, log=quiet, progress=False)
    assert any(p.stat().st_mtime_ns != stamp[p] for p in targets["test"].rglob("*.png"))


def test_cifar10_interrupted_run_leaves_nothing(tmp_path, fake, monkeypatch):
    folder, _, truth = fake
    calls = {"n": 0}
    save = Image.Image.save

    def flaky_save(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return save(self, *a, **k)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        P.prepare_cifar10(tmp_path, source=folder, splits="test", verify=False, log=quiet, progress=False, workers=1)
    parent = tmp_path / "data" / "cifar10"
    assert list(parent.iterdir()) == []  # no split folder, no temporary folder
    monkeypatch.setattr(Image.Image, "save", save)
    # a leftover of a killed run (its process gone) is cleaned up by the next run
    stale = parent / ".test.tmp-999999999-abcd"
    (stale / "airplane").mkdir(parents=True)
    messages = []
    P.prepare_cifar10(tmp_path, source=folder, splits="test", verify=False, log=messages.append, progress=False)
    assert not stale.exists() and any("interrupted earlier run" in m for m in messages)
    check_written({"test": parent / "test"}, truth, splits=("test",))


def test_cifar10_incomplete_target_is_an_error_or_replaced(tmp_path, fake, capsys):
    folder, _, truth = fake
    target = tmp_path / "data" / "cifar10" / "test"
    (target / "airplane").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(target / "airplane" / "0000.png")
    with pytest.raises(FileExistsError) as err:
        P.prepare_cifar10(tmp_path, source=folder, splits="test", verify=False, log=quiet, progress=False)
    assert str(target) in str(err.value) and "--force" in str(err.value)
    assert P.main(["cifar10", "--root", str(tmp_path), "--source", str(folder), "--split", "test",
                   "--no-verify", "--quiet"]) == 1
    assert "not a complete CIFAR-10 test split" in capsys.readouterr().err
    P.prepare_cifar10(tmp_path, source=folder, splits="test", verify=False, force=True, log=quiet, progress=False)
    check_written({"test": target}, truth, splits=("test",))
    # an empty folder is simply filled
    (tmp_path / "e" / "data" / "cifar10" / "test").mkdir(parents=True)
    P.prepare_cifar10(tmp_path / "e", source=folder, splits="test", verify=False, log=quiet, progress=False)


def test_cifar10_copy_made_otherwise_with_the_published_counts_is_complete(tmp_path, monkeypatch):
    monkeypatch.setitem(P.CIFAR10_PER_CLASS, "test", 2)
    target = tmp_path / "test"
    for c in CLASSES:
        (target / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32)).save(target / c / f"{i:04d}.jpg", quality=75)
    assert cifar10._split_state(target, "test")[0] == "complete"
    (target / "cat" / "0001.jpg").unlink()
    state, detail = cifar10._split_state(target, "test")
    assert state == "incomplete" and "cat 1 of 2" in detail


def test_cifar10_split_with_folders_that_are_no_classes_is_complete(tmp_path, monkeypatch):
    """Hidden folders, __MACOSX and @eaDir are never classes, in tta-data as in
    tta-bench: beside a complete split they do not make it "incomplete" (which
    refused it and offered --force, rewriting the data set)."""
    monkeypatch.setitem(P.CIFAR10_PER_CLASS, "test", 1)
    target = tmp_path / "test"
    for c in CLASSES:
        (target / c).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(target / c / "0000.jpg", quality=75)
    for other in (".ipynb_checkpoints", "__MACOSX", "@eaDir"):
        (target / other).mkdir()
    assert cifar10._split_state(target, "test") == ("complete", "10 images in 10 class folders")


def test_cifar10_download_failure_says_how_to_do_it_offline(tmp_path, monkeypatch):
    import torchvision.datasets

    class NoNetwork:
        def __init__(self, *a, **k):
            raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", NoNetwork)
    with pytest.raises(RuntimeError) as err:
        P.prepare_cifar10(tmp_path, splits="test", log=quiet, progress=False)
    msg = str(err.value)
    assert P.CIFAR10_URL in msg and P.CIFAR10_TAR_MD5 in msg and "--source" in msg and "no route" in msg


def test_cifar10_bad_sources(tmp_path, fake):
    folder, _, _ = fake
    with pytest.raises(FileNotFoundError, match="does not exist"):
        P.prepare_cifar10(tmp_path, source=tmp_path / "nope", log=quiet, progress=False)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a tar archive"):
        P.prepare_cifar10(tmp_path, source=tmp_path / "x.txt", log=quiet, progress=False)
    with pytest.raises(ValueError, match="unknown CIFAR-10 split 'val'"):
        P.prepare_cifar10(tmp_path, source=folder, splits="val", log=quiet, progress=False)
    # a batch file that would run code when unpickled is refused
    evil = tmp_path / "evil" / P.CIFAR10_FOLDER_NAME
    evil.mkdir(parents=True)
    for f in folder.iterdir():
        (evil / f.name).write_bytes(f.read_bytes())
    (evil / "test_batch").write_bytes(pickle.dumps({b"data": os.getcwd}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load"):
        P.prepare_cifar10(tmp_path / "o", source=evil, splits="test", verify=False, log=quiet, progress=False)


def test_python_m_tta_data(tmp_path, fake):
    _, tgz, truth = fake
    env = dict(os.environ, TTA_HOME=str(tmp_path / "home"))
    proc = subprocess.run(
        [sys.executable, "-m", "tta.data", "cifar10", "--source", str(tgz), "--no-verify", "--quiet"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    home = tmp_path / "home" / "data" / "cifar10"
    assert "export TTA_HOME" not in proc.stdout  # the default root already is $TTA_HOME
    assert f"data.root={home / 'test'}" in proc.stdout and f"data.source_root={home / 'train'}" in proc.stdout
    check_written({s: home / s for s in ("train", "test")}, truth)


def test_help_for_every_subcommand(capsys):
    for argv in ([], ["cifar10"], ["cifar10-c"], ["imagenet-c"]):
        with pytest.raises(SystemExit) as exit_:
            P.main([*argv, "--help"])
        assert exit_.value.code == 0
        assert "usage: tta-data" in capsys.readouterr().out


# ----------------------------------------------------------------------------------
# CIFAR-10-C
# ----------------------------------------------------------------------------------

N_C = 3  # images per severity in the fakes


def write_fake_cifar10c(folder: Path, names=NAMES + EXTRA_NAMES) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    np.save(folder / "labels.npy", np.tile(rng.integers(0, 10, N_C), 5).astype(np.uint8))
    for name in names:
        np.save(folder / f"{name}.npy", rng.integers(0, 256, (5 * N_C, 32, 32, 3), dtype=np.uint8))
    return folder


def test_cifar10c_layout_good_and_bad(tmp_path, capsys):
    good = write_fake_cifar10c(tmp_path / "CIFAR-10-C")
    report = P.check_cifar10c_folder(good)
    assert report.usable and len(report.present) == 20 and report.counts["fog.npy"] == 5 * N_C
    assert P.main(["cifar10-c", "--source", str(good), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"tta-bench data=cifar10c_disk data.root={good}" in out and "usable: yes" in out

    (good / "fog.npy").unlink()
    np.save(good / "frost.npy", np.zeros((5 * N_C, 32, 32, 3), np.float32))
    np.save(good / "snow.npy", np.zeros((5 * N_C, 32, 32), np.uint8))
    np.save(good / "spatter.npy", np.zeros((5 * N_C + 5, 32, 32, 3), np.uint8))  # an extra, present: checked
    (good / "saturate.npy").unlink()  # an extra, absent: optional
    report = P.check_cifar10c_folder(good)
    assert not report.usable
    assert report.missing == ["fog.npy"] and report.optional_missing == ["saturate.npy"]
    assert "float32" in report.bad["frost.npy"] and "(15, 32, 32)" in report.bad["snow.npy"]
    assert "labels.npy has 15" in report.bad["spatter.npy"]
    assert P.main(["cifar10-c", "--source", str(good), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "missing: 1: fog.npy" in captured.out and "not usable" in captured.err
    # restricted to good names it is usable again; an unknown name is an error naming it
    assert P.check_cifar10c_folder(good, ["gaussian_noise", "contrast"]).usable
    assert P.main(["cifar10-c", "--source", str(good), "--corruptions", "gaussian_noise,contrast", "--quiet"]) == 0
    assert "'data.corruptions=[gaussian_noise,contrast]'" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown corruption 'gausian_noise'.*gaussian_noise"):
        P.check_cifar10c_folder(good, ["gausian_noise"])
    # labels out of range, and a file that is not .npy
    np.save(good / "labels.npy", np.full(5 * N_C, 10, np.int64))
    (good / "contrast.npy").write_bytes(b"not an array")
    report = P.check_cifar10c_folder(good)
    assert "outside 0..9" in report.bad["labels.npy"] and "not a readable .npy" in report.bad["contrast.npy"]


def test_cifar10c_without_source_says_where_to_get_it(tmp_path, capsys):
    assert P.main(["cifar10-c", "--root", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "https://zenodo.org/records/2535967" in err and "CIFAR-10-C.tar" in err
    assert str(tmp_path / "data" / "CIFAR-10-C") in err and "data=cifar10c_disk" in err
    # once the folder is there, the same command checks it
    write_fake_cifar10c(tmp_path / "data" / "CIFAR-10-C")
    assert P.main(["cifar10-c", "--root", str(tmp_path), "--quiet"]) == 0


def test_cifar10c_tar_checksums_and_extraction(tmp_path, monkeypatch):
    src = write_fake_cifar10c(tmp_path / "src" / "CIFAR-10-C")
    tar = tar_folder(src, tmp_path / "CIFAR-10-C.tar", "w")
    root = tmp_path / "home"
    target = root / "data" / "CIFAR-10-C"
    # the published size does not match the fake: refused before extracting
    with pytest.raises(P.ChecksumError, match="bytes, the published CIFAR-10-C.tar has 2918471680"):
        P.prepare_cifar10c(tar, root, log=quiet, progress=False)
    sha = hashlib.sha256(tar.read_bytes()).hexdigest()
    real = P.CIFAR10C_TAR
    monkeypatch.setattr(cifar10c, "CIFAR10C_TAR", dataclasses.replace(real, size=tar.stat().st_size, sha256=sha))
    with pytest.raises(P.ChecksumError) as err:  # md5 still the real one
        P.prepare_cifar10c(tar, root, log=quiet, progress=False)
    assert real.md5 in str(err.value) and md5(tar) in str(err.value) and "--no-verify" in str(err.value)
    assert not target.exists() and list((root / "data").iterdir()) == []
    monkeypatch.setattr(cifar10c, "CIFAR10C_TAR",
                        dataclasses.replace(real, size=tar.stat().st_size, md5=md5(tar), sha256="0" * 64))
    with pytest.raises(P.ChecksumError, match="sha256"):
        P.prepare_cifar10c(tar, root, log=quiet, progress=False)
    assert not target.exists()
    monkeypatch.setattr(cifar10c, "CIFAR10C_TAR",
                        dataclasses.replace(real, size=tar.stat().st_size, md5=md5(tar), sha256=sha))
    messages = []
    report = P.prepare_cifar10c(tar, root, log=messages.append, progress=False)
    assert report.usable and report.root == target and any("match the published" in m for m in messages)
    np.testing.assert_array_equal(np.load(target / "fog.npy"), np.load(src / "fog.npy"))
    assert sorted(p.name for p in (root / "data").iterdir()) == ["CIFAR-10-C"]
    # again: nothing to do
    messages.clear()
    assert P.prepare_cifar10c(tar, root, log=messages.append, progress=False).usable
    assert any("already holds a usable CIFAR-10-C" in m for m in messages)
    # a modified copy: --no-verify
    monkeypatch.setattr(cifar10c, "CIFAR10C_TAR", real)
    assert P.main(["cifar10-c", "--source", str(tar), "--root", str(tmp_path / "h2"), "--no-verify", "--quiet"]) == 0
    # an existing unusable folder is an error, --force replaces it
    (target / "fog.npy").unlink()
    with pytest.raises(FileExistsError, match="--force"):
        P.prepare_cifar10c(tar, root, verify=False, log=quiet, progress=False)
    assert P.prepare_cifar10c(tar, root, verify=False, force=True, log=quiet, progress=False).usable


# ----------------------------------------------------------------------------------
# ImageNet-C
# ----------------------------------------------------------------------------------


def write_fake_imagenetc(root: Path, corruption: str = "fog", severity: int = 5, per_class: int = 1) -> Path:
    sdir = root / corruption / str(severity)
    for wnid in imagenet_wnids():
        (sdir / wnid).mkdir(parents=True)
        for i in range(per_class):
            (sdir / wnid / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(b"\xff\xd8\xff fake")
    return root


def test_imagenetc_layout_good_and_bad(tmp_path, capsys):
    root = write_fake_imagenetc(tmp_path / "ImageNet-C")
    report = P.check_imagenetc_folder(root, ["fog"], [5], progress=False)
    assert report.usable and report.counts == {"fog/5": 1000}
    assert any("other than the published 50000" in n for n in report.notes)
    assert P.main(["imagenet-c", "--source", str(root), "--corruptions", "fog", "--severities", "5", "--quiet"]) == 0
    assert (f"tta-bench data=imagenetc data.root={root} 'data.corruptions=[fog]' data.severity=5"
            in capsys.readouterr().out)
    # the default check wants the 15 corruptions at severities 1-5
    report = P.check_imagenetc_folder(root, progress=False)
    assert not report.usable and "fog/1" in report.missing and "gaussian_noise" in report.missing
    assert "fog/5" in report.present and set(report.optional_missing) == set(EXTRA_NAMES)
    assert P.main(["imagenet-c", "--source", str(root), "--quiet"]) == 1
    capsys.readouterr()
    # a missing wnid folder, an empty one
    wnids = imagenet_wnids()
    sdir = root / "fog" / "5"
    for f in (sdir / wnids[3]).iterdir():
        f.unlink()
    (sdir / wnids[3]).rmdir()
    for f in (sdir / wnids[7]).iterdir():
        f.unlink()
    report = P.check_imagenetc_folder(root, ["fog"], [5], progress=False)
    assert not report.usable
    assert f"1 of the 1000 wnid folders missing (e.g. {wnids[3]})" in report.bad["fog/5"]
    assert f"1 wnid folders without images (e.g. {wnids[7]})" in report.bad["fog/5"]
    with pytest.raises(ValueError, match="severity 6 is out of range"):
        P.check_imagenetc_folder(root, ["fog"], [6], progress=False)


def test_imagenetc_without_source_says_where_to_get_it(tmp_path, capsys):
    assert P.main(["imagenet-c", "--root", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "https://zenodo.org/records/2235448" in err
    for name in ("blur.tar", "digital.tar", "noise.tar", "weather.tar", "extra.tar"):
        assert name in err
    assert "data=imagenetc" in err and str(tmp_path / "data" / "ImageNet-C") in err


def test_imagenetc_tar_checksum_and_extraction(tmp_path, monkeypatch):
    src = write_fake_imagenetc(tmp_path / "src")
    tar = tmp_path / "weather.tar"
    with tarfile.open(tar, "w") as t:
        t.add(src / "fog", arcname="fog")
    root = tmp_path / "home"
    target = root / "data" / "ImageNet-C"
    with pytest.raises(P.ChecksumError) as err:
        P.prepare_imagenetc([tar], root, ["fog"], [5], log=quiet, progress=False)
    assert str(tar) in str(err.value) and P.IMAGENETC_TARS["weather"].md5 in str(err.value)
    assert md5(tar) in str(err.value) and "--no-verify" in str(err.value)
    assert not (target / "fog").exists() and [p.name for p in target.iterdir()] == []
    monkeypatch.setitem(P.IMAGENETC_TARS, "weather", dataclasses.replace(P.IMAGENETC_TARS["weather"], md5=md5(tar)))
    report = P.prepare_imagenetc(tar, root, ["fog"], [5], log=quiet, progress=False)
    assert report.usable and report.root == target and report.counts == {"fog/5": 1000}
    assert sorted(p.name for p in target.iterdir()) == ["fog"]
    # fog alone is not all of weather.tar (snow, frost, brightness): an error naming them, unless --force
    with pytest.raises(FileExistsError, match="fog but not all of weather.tar"):
        P.prepare_imagenetc(tar, root, ["fog"], [5], log=quiet, progress=False)
    assert P.prepare_imagenetc(tar, root, ["fog"], [5], force=True, log=quiet, progress=False).usable


# ----------------------------------------------------------------------------------
# Reading image folders (tta.data.list_image_folder, load_image_folder)
# ----------------------------------------------------------------------------------


def _images(folder: Path, names, size=(4, 4)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", size, (30 * i, 0, 0)).save(folder / name)


def test_load_image_folder_refuses_bad_counts_and_names_two_sizes(tmp_path):
    from tta.data import load_image_folder

    for c in ("a", "b"):
        _images(tmp_path / c, ["0.png", "1.png"])
    for bad in (0, -3, 2.5, True, "2"):
        with pytest.raises(ValueError, match=rf"num_images={bad!r}: give a whole number"):
            load_image_folder(tmp_path, bad)
    assert load_image_folder(tmp_path, 3)[0].shape == (3, 3, 4, 4)
    assert load_image_folder(tmp_path, 100)[0].shape == (4, 3, 4, 4)  # at most the folder
    assert load_image_folder(tmp_path, 3, seed=7)[1].tolist() == load_image_folder(tmp_path, 3, seed=7)[1].tolist()
    _images(tmp_path / "b", ["2.png"], size=(6, 5))
    with pytest.raises(ValueError) as err:
        load_image_folder(tmp_path, shuffle=False)
    msg = str(err.value)
    assert f"{tmp_path / 'a' / '0.png'} is 4x4" in msg and f"{tmp_path / 'b' / '2.png'} is 6x5" in msg
    assert "resize" in msg


def test_load_image_folder_names_the_file_it_cannot_decode(tmp_path):
    """A truncated JPEG (Pillow: "Truncated File Read"), an empty or a text file named
    like an image, a folder or a broken symlink named like one: the error names it."""
    from tta.data import load_image_folder

    _images(tmp_path / "a", ["0.jpg"])
    whole = (tmp_path / "a" / "0.jpg").read_bytes()
    makers = {
        "cut.jpg": lambda p: p.write_bytes(whole[: len(whole) // 2]),
        "empty.png": lambda p: p.write_bytes(b""),
        "text.png": lambda p: p.write_text("not an image"),
        "dir.png": lambda p: p.mkdir(),
        "link.png": lambda p: p.symlink_to(tmp_path / "gone.png"),
    }
    for name, make in makers.items():
        (tmp_path / "b").mkdir()
        make(tmp_path / "b" / name)
        # the same error class as tta-bench's decoding (an OSError)
        with pytest.raises(ImageFileError, match=f"cannot decode image file {re.escape(str(tmp_path / 'b' / name))}"):
            load_image_folder(tmp_path, shuffle=False)
        shutil.rmtree(tmp_path / "b")


def test_files_of_other_extensions_are_counted_and_the_accepted_ones_named(tmp_path):
    for c in ("a", "b"):
        _images(tmp_path / c, ["0.tif", "1.gif"])
        (tmp_path / c / "README").write_text("not an image")
    with pytest.raises(FileNotFoundError) as err:
        list_image_folder(tmp_path)
    msg = str(err.value)
    assert ".jpg, .jpeg, .png, .bmp, .webp" in msg and "6 files left out" in msg and ".tif (2)" in msg
    # beside images: read, and a warning counts the image files left out (not the README)
    _images(tmp_path / "a", ["2.png"])
    with pytest.warns(UserWarning, match=r"4 image files under .* left out for their extension: \.(tif|gif) \(2\)"):
        files, _, _ = list_image_folder(tmp_path)
    assert [f.name for f in files] == ["2.png"]


def test_images_in_folders_inside_class_folders_are_not_left_out_silently(tmp_path):
    """torchvision's ImageFolder reads <root>/<class>/<sub>/<image> too; tta reads one
    level: the images of sub-folders were left out without a word (2 of 4 here)."""
    _images(tmp_path / "a", ["0.png"])
    _images(tmp_path / "a" / "sub", ["1.png", "2.png"])
    _images(tmp_path / "b", ["3.png"])
    (tmp_path / "b" / ".ipynb_checkpoints").mkdir()  # never a place for images: no warning for it
    with pytest.warns(UserWarning, match=r"1 folders inside class folders, e\.g\. .*sub, left out") as record:
        files, _, _ = list_image_folder(tmp_path)
    assert len(record) == 1 and [f.name for f in files] == ["0.png", "3.png"]
    (tmp_path / "a" / "0.png").unlink()
    (tmp_path / "b" / "3.png").unlink()
    with pytest.raises(FileNotFoundError, match="folders inside class folders"):
        list_image_folder(tmp_path)


def test_severities_and_corruptions_are_refused_not_coerced(tmp_path, capsys):
    root = write_fake_imagenetc(tmp_path / "ImageNet-C")
    # one int, one name as a string: taken as one
    report = P.check_imagenetc_folder(root, "fog", 5, progress=False)
    assert report.usable and report.severities == (5,) and report.corruptions == ("fog",)
    assert P.check_cifar10c_folder(tmp_path / "none", "fog").missing == ["labels.npy", "fog.npy"]
    for bad, match in [([5.9], "severity 5.9 is not an integer"), ([True], "severity True is not an integer"),
                       ("15", r"severities='15': give a severity 1\.\.5 or a sequence"),
                       (2.0, r"severities=2\.0: give a severity"), ([6], "severity 6 is out of range")]:
        with pytest.raises(ValueError, match=match):
            P.check_imagenetc_folder(root, ["fog"], bad, progress=False)
        with pytest.raises(ValueError, match=match):
            P.prepare_imagenetc(root, tmp_path, ["fog"], bad, progress=False)
    with pytest.raises(ValueError, match="corruption 5 is not a name"):
        P.check_imagenetc_folder(root, ["fog", 5], [5], progress=False)
    with pytest.raises(ValueError, match="corruptions=5: give a corruption name"):
        P.check_cifar10c_folder(root, 5)
    # the command line's words are whole numbers, or refused naming the word
    assert P.main(["imagenet-c", "--source", str(root), "--corruptions", "fog", "--severities", "5", "--quiet"]) == 0
    assert P.main(["imagenet-c", "--source", str(root), "--corruptions", "fog", "--severities", "2.5"]) == 1
    assert "severity '2.5' is not an integer" in capsys.readouterr().err


# ----------------------------------------------------------------------------------
# Where tta-data writes: $TTA_HOME looked up only when needed, --root checked
# ----------------------------------------------------------------------------------


def test_an_empty_tta_home_is_needed_only_where_tta_data_writes_or_reads_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TTA_HOME", "")
    for argv in ([], ["cifar10-c"]):
        with pytest.raises(SystemExit) as exit_:
            P.main([*argv, "--help"])
        assert exit_.value.code == 0 and "set but empty" in capsys.readouterr().out
    # a folder checked in place, and --root DIR, need no TTA_HOME
    good = write_fake_cifar10c(tmp_path / "CIFAR-10-C")
    assert P.main(["cifar10-c", "--source", str(good), "--quiet"]) == 0
    assert "data=cifar10c_disk" in capsys.readouterr().out
    assert P.main(["cifar10-c", "--root", str(tmp_path / "home"), "--quiet"]) == 1  # not there: where to get it
    assert "zenodo" in capsys.readouterr().err
    # where it is needed, the error says how to do without it
    assert P.main(["cifar10-c", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "TTA_HOME is set but empty" in err and "--root DIR" in err and "Traceback" not in err


def test_an_empty_root_is_refused(tmp_path, fake, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    batches = fake[0]
    for argv in (["cifar10", "--source", str(batches), "--split", "test", "--no-verify"], ["cifar10-c"],
                 ["imagenet-c"]):
        assert P.main([*argv, "--root", "", "--quiet"]) == 1
        assert "--root '' is empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written in the current folder
    with pytest.raises(ValueError, match="is empty"):
        P.prepare_cifar10c(tmp_path, root=" ")


def test_a_read_only_root_says_where_it_tried_and_how_to_write_elsewhere(tmp_path, monkeypatch, capsys):
    import errno

    src = write_fake_cifar10c(tmp_path / "src" / "CIFAR-10-C")
    tar = tar_folder(src, tmp_path / "CIFAR-10-C.tar", "w")
    ro = tmp_path / "ro"
    ro.mkdir()
    mkdir = Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):  # as on a read-only mount (the tests may run as root)
        if self == ro or ro in self.parents:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    assert P.main(["cifar10-c", "--source", str(tar), "--root", str(ro), "--no-verify", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"cannot write {ro / 'data' / 'CIFAR-10-C'}: Read-only file system" in err
    assert "--root DIR" in err and "another TTA_HOME" in err


# ----------------------------------------------------------------------------------
# The printed tta-bench line runs as printed
# ----------------------------------------------------------------------------------

#: Folder names the shell or Hydra's override grammar would split or misread unquoted.
ODD_NAMES = ["my CIFAR-10-C, copy", "it's", 'say "hi"', "cost=$5 ${x}", "back\\slash\\", "caf\u00e9 [1]~"]


def _bench_overrides(out: str) -> list[str]:
    """The overrides of the last ``tta-bench`` line in ``out`` (the one that spells
    them out), as bash would split them, each checked by Hydra's override parser."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    line = [ln for ln in out.splitlines() if ln.strip().startswith("tta-bench ")][-1]
    words = shlex.split(line, comments=True)
    assert words[0] == "tta-bench"
    parser = OverridesParser.create()
    for word in words[1:]:
        parser.parse_override(word)
    return words[1:]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_the_printed_tta_bench_line_reads_back_the_folder(tmp_path, capsys, name):
    pytest.importorskip("hydra")
    from tta.bench import compose_config

    folder = write_fake_cifar10c(tmp_path / name, names=("fog", "contrast"))
    assert P.main(["cifar10-c", "--source", str(folder), "--corruptions", "fog,contrast", "--quiet"]) == 0
    cfg = compose_config(_bench_overrides(capsys.readouterr().out))
    assert cfg.data.name == "cifar10c_disk" and cfg.data.root == str(folder)
    assert list(cfg.data.corruptions) == ["fog", "contrast"]
    # CIFAR-10's lines: data.root and data.source_root, and the export of TTA_HOME
    home = tmp_path / name / "home"
    out = P.cifar10_next_step({s: home / "data" / "cifar10" / s for s in ("train", "test")})
    cfg = compose_config(_bench_overrides(out))
    assert cfg.data.root == str(home / "data" / "cifar10" / "test")
    assert cfg.data.source_root == str(home / "data" / "cifar10" / "train")
    import shlex

    export = next(ln for ln in out.splitlines() if "export TTA_HOME=" in ln)
    assert shlex.split(export) == ["export", f"TTA_HOME={home}"]
