"""Loading models from untrusted or broken places: a ``$TTA_HOME`` zoo manifest that
tries to weaken verification or point outside the zoo, files that are not
checkpoints, and a read-only ``$TTA_HOME`` with a checkpoint missing."""

import errno
import json
import os
import pathlib
import re
import tempfile
import urllib.error
import urllib.request

import pytest
import torch

import tta
from tta.models import CifarResNet, zoo
from tta.paths import sha256_of

# ----------------------------------------------------------------------------------
# $TTA_HOME/models/zoo/manifest.json on top of the bundled one
# ----------------------------------------------------------------------------------


def _save(path, seed):
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(CifarResNet(20).state_dict(), path)
    return sha256_of(path)


@pytest.fixture
def zoo_dirs(tmp_path, monkeypatch):
    """A bundled folder whose manifest knows ``m`` (checkpoint m.pt), and an empty
    ``$TTA_HOME/models/zoo``."""
    bundled, home = tmp_path / "bundled", tmp_path / "home" / "models" / "zoo"
    sha = _save(bundled / "m.pt", seed=0)
    (bundled / "manifest.json").write_text(json.dumps(
        {"format": 1, "models": {"m": {"file": "m.pt", "sha256": sha, "architecture": "cifar_resnet20"}}}))
    home.mkdir(parents=True)
    monkeypatch.setenv("TTA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(zoo, "bundled_dir", lambda: bundled)
    return bundled, home


def _home_manifest(home, models):
    path = home / "manifest.json"
    path.write_text(json.dumps({"format": 1, "models": models}))
    return path


def test_home_manifest_cannot_drop_or_change_the_bundled_sha256(zoo_dirs):
    bundled, home = zoo_dirs
    mine = _save(home / "mine.pt", seed=1)  # another model, in the home folder
    tta.load_model("zoo:m")  # the bundled file, verified
    # an entry without sha256, pointing at another file: still checked against the bundled one
    for entry in ({"file": "mine.pt", "architecture": "cifar_resnet20"},
                  {"file": "mine.pt", "description": "re-trained"}):  # the other fields from the bundled entry
        path = _home_manifest(home, {"m": entry})
        info = zoo.zoo_info("m")
        assert info["sha256"] == sha256_of(bundled / "m.pt") and info["architecture"] == "cifar_resnet20"
        with pytest.raises(ValueError, match="checksum mismatch") as err:
            tta.load_model("zoo:m")
        assert str(home / "mine.pt") in str(err.value) and str(bundled / "manifest.json") in str(err.value)
    assert zoo.zoo_info("m")["description"] == "re-trained"
    # an entry giving that file's sha256: the bundled one still wins, and the error says why
    _home_manifest(home, {"m": {"file": "mine.pt", "sha256": mine}})
    with pytest.raises(ValueError, match="checksum mismatch") as err:
        tta.load_model("zoo:m")
    assert str(path) in str(err.value) and "cannot change the sha256" in str(err.value)
    tta.load_model("zoo:m", verify=False)  # the documented way to load your own weights
    # the same file under a new name is a new model: its own sha256 is used
    _home_manifest(home, {"m2": {"file": "mine.pt", "sha256": mine, "architecture": "cifar_resnet20"}})
    tta.load_model("zoo:m2")


@pytest.mark.parametrize("entry, problem", [
    ({"file": "mine.pt", "architecture": "cifar_resnet20"}, 'has no "sha256"'),
    ({"file": "mine.pt", "architecture": "cifar_resnet20", "sha256": "abc123"}, "64 hex digits"),
    ({"file": "mine.pt", "architecture": "cifar_resnet20", "sha256": None}, "must be a string"),
])
def test_new_home_manifest_entry_needs_a_well_formed_sha256(zoo_dirs, entry, problem):
    _, home = zoo_dirs
    _save(home / "mine.pt", seed=1)
    path = _home_manifest(home, {"mine": entry})
    with pytest.raises(ValueError, match=problem) as err:
        tta.load_model("zoo:mine")
    assert f"zoo manifest {path}, entry 'mine'" in str(err.value)


@pytest.mark.parametrize("file, problem", [
    ("ABSOLUTE", "is absolute"),
    ("../../outside.pt", "leaves the zoo folder"),
    ("sub/../../../outside.pt", "leaves the zoo folder"),
])
def test_manifest_file_must_stay_inside_the_zoo_folder(zoo_dirs, tmp_path, file, problem):
    _, home = zoo_dirs
    outside = tmp_path / "outside.pt"
    sha = _save(outside, seed=2)
    file = str(outside) if file == "ABSOLUTE" else file
    path = _home_manifest(home, {"x": {"file": file, "sha256": sha, "architecture": "cifar_resnet20"}})
    with pytest.raises(ValueError, match=problem) as err:
        tta.load_model("zoo:x")
    assert f"zoo manifest {path}, entry 'x'" in str(err.value)
    with pytest.raises(ValueError, match=problem):
        tta.list_models("zoo:*")


def test_a_name_that_leaves_the_zoo_folder_is_refused(zoo_dirs, tmp_path):
    _, home = zoo_dirs
    sha = _save(tmp_path / "home" / "models" / "evil.pt", seed=2)  # one folder above the zoo
    _home_manifest(home, {"../evil": {"sha256": sha, "architecture": "cifar_resnet20"}})
    with pytest.raises(ValueError, match="its name gives the file '../evil.pt'"):
        tta.load_model("zoo:../evil")


def test_symlink_out_of_the_zoo_folder_is_refused(zoo_dirs, tmp_path):
    _, home = zoo_dirs
    outside = tmp_path / "outside.pt"
    sha = _save(outside, seed=2)
    (home / "x.pt").symlink_to(outside)
    _home_manifest(home, {"x": {"file": "x.pt", "sha256": sha, "architecture": "cifar_resnet20"},
                          "y": {"file": "y.pt", "sha256": sha, "architecture": "cifar_resnet20"}})
    with pytest.raises(ValueError, match="outside its folder") as err:
        tta.load_model("zoo:x")
    assert str(home / "x.pt") in str(err.value) and str(outside) in str(err.value)
    tta.load_model("zoo:x", weights=outside)  # an explicit weights= is the user's choice
    # a link that stays inside the folder is fine
    os.replace(outside, home / "real.pt")
    (home / "y.pt").symlink_to(home / "real.pt")
    tta.load_model("zoo:y")


MALFORMED = [
    ("{not json", None, "is not valid JSON"),
    ("[]", None, "must be a JSON object"),
    ('{"format": 1}', None, 'has no "models" key'),
    ('{"format": 2, "models": {}}', None, "format 2"),
    ('{"models": ["m"]}', None, '"models" must be an object'),
    ('{"models": {"m": "m.pt"}}', "m", "must be an object, got a str"),
    ('{"models": {"m": {"architecture": 20}}}', "m", '"architecture" must be a string'),
    ('{"models": {"m": {"file": ["m.pt"]}}}', "m", '"file" must be a string'),
    ('{"models": {"new": {"sha256": "' + "0" * 64 + '"}}}', "new", 'has no "architecture"'),
]


def test_malformed_manifest_is_one_error_naming_the_file_and_the_entry(zoo_dirs):
    _, home = zoo_dirs
    path = home / "manifest.json"
    for text, entry, problem in MALFORMED:
        path.write_text(text)
        for call in (lambda: tta.load_model("zoo:m"), lambda: tta.list_models("zoo:*")):
            with pytest.raises(ValueError, match=problem) as err:
                call()
            where = f"zoo manifest {path}" + (f", entry {entry!r}" if entry else "")
            assert str(err.value).startswith(where), (text, str(err.value))
    # the bundled manifest is checked the same way
    path.unlink()
    bundled = zoo.bundled_dir() / "manifest.json"
    bundled.write_text('{"models": {"m": {"architecture": "cifar_resnet20"}}}')
    with pytest.raises(ValueError, match=re.escape(f"zoo manifest {bundled}, entry 'm': has no \"sha256\"")):
        tta.load_model("zoo:m")


def test_missing_zoo_checkpoint_names_the_path_and_sha256_to_place_it_with(zoo_dirs):
    bundled, home = zoo_dirs
    sha = sha256_of(bundled / "m.pt")
    (bundled / "m.pt").unlink()
    with pytest.raises(FileNotFoundError) as err:
        tta.load_model("zoo:m")
    assert f"Put m.pt (sha256 {sha}) at {home / 'm.pt'}" in str(err.value)


# ----------------------------------------------------------------------------------
# weights= that is not a checkpoint
# ----------------------------------------------------------------------------------

TEXT = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


@pytest.mark.parametrize("name, kwargs", [
    ("cifar10_resnet20", {}),
    ("timm:tta_cifar_resnet20", {"pretrained": False}),
    ("zoo:resnet20_bn_jpeg", {"verify": False}),
])
def test_weights_that_are_not_a_checkpoint_name_the_file(tmp_path, name, kwargs):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    cases = {"passwd": TEXT, "empty.pt": b"", "image.th": b"\x89PNG\r\n\x1a\n" + bytes(64)}
    if os.path.isfile("/etc/passwd"):
        cases["/etc/passwd"] = None
    for file, data in cases.items():
        path = pathlib.Path(file) if data is None else tmp_path / file
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(ValueError, match="is not a checkpoint") as err:
            tta.load_model(name, weights=path, **kwargs)
        assert str(path) in str(err.value) and "a valid checkpoint is a file written by torch.save" in str(err.value)


def test_weights_and_image_folders_may_start_with_a_tilde(tmp_path, monkeypatch):
    """weights="~/..." (tta-bench: model.weights=~/...) and load_image_folder("~/...")
    read the home folder, as data.root, TTA_HOME and torchvision's ImageFolder do:
    they failed with "checkpoint not found: ~/r20.th"."""
    from PIL import Image

    from tta.data import load_image_folder

    monkeypatch.setenv("HOME", str(tmp_path))
    net = CifarResNet(20, num_classes=10)
    torch.save(net.state_dict(), tmp_path / "r20.th")
    for weights in ("~/r20.th", pathlib.Path("~/r20.th")):
        model = tta.load_model("cifar10_resnet20", weights=weights)
        assert torch.equal(model.backbone.conv1.weight, net.conv1.weight)
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / "cat" / "0.png")
    assert load_image_folder("~/imgs")[0].shape == (1, 3, 4, 4)


def test_a_checkpoint_of_other_shapes_names_the_file_and_the_keys(tmp_path):
    path = tmp_path / "cifar100.pt"
    torch.save(CifarResNet(20, num_classes=100).state_dict(), path)
    with pytest.raises(ValueError, match=r"does not match CifarResNet.*linear.weight \(100, 64\) \(the model's "
                                         r"\(10, 64\)\)") as err:
        tta.load_model("cifar10_resnet20", weights=path)
    assert str(path) in str(err.value)


def test_bare_models_refuse_integer_images_and_cast_other_floats(noisy_batch):
    model = tta.load_model("cifar10_resnet20")
    with pytest.raises(TypeError, match=r"got dtype torch.uint8; convert uint8 images with x.float\(\) / 255"):
        model((noisy_batch[:2] * 255).to(torch.uint8))  # normalised as uint8, every logit was NaN
    with torch.no_grad():
        torch.testing.assert_close(model(noisy_batch[:4].double()), model(noisy_batch[:4]))


def test_truncated_or_mislabelled_checkpoints_name_the_file(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(CifarResNet(20).state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:4096])
    with pytest.raises(ValueError, match="truncated or corrupted") as err:
        tta.load_model("cifar10_resnet20", weights=truncated)
    assert str(truncated) in str(err.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(TEXT)
    with pytest.raises(ValueError, match="not a readable safetensors file") as err:
        tta.load_model("cifar10_resnet20", weights=junk)
    assert str(junk) in str(err.value)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        tta.load_model("cifar10_resnet20", weights=tmp_path)
    # a safetensors file under another suffix is recognised by its header
    from safetensors.torch import save_file

    other = tmp_path / "weights.bin"
    save_file(CifarResNet(20).state_dict(), str(other))
    tta.load_model("cifar10_resnet20", weights=other)


# ----------------------------------------------------------------------------------
# a missing checkpoint under a read-only $TTA_HOME
# ----------------------------------------------------------------------------------


@pytest.fixture
def read_only_home(tmp_path, monkeypatch):
    """``$TTA_HOME`` on a read-only file system: nothing can be created under it
    (tests run as root, whom permissions do not stop, so the two calls that create
    files and folders fail as a read-only mount makes them fail). The network must
    not be tried."""
    home = tmp_path / "ro-home"
    (home / "models").mkdir(parents=True)
    real_mkdir, real_mkstemp = pathlib.Path.mkdir, tempfile.mkstemp

    def under_home(path):
        return pathlib.Path(os.path.abspath(path)).is_relative_to(home)

    def mkdir(self, *args, **kwargs):
        if under_home(self) and not self.is_dir():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and under_home(dir):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    def urlopen(*args, **kwargs):
        raise AssertionError("the network was tried although nothing can be written")

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setenv("TTA_HOME", str(home))
    return home


def test_missing_checkpoint_under_a_read_only_home_says_where_to_place_it(read_only_home):
    dest = read_only_home / "models" / "cifar10" / "resnet20-12fca82f.th"
    with pytest.raises(RuntimeError, match="place the file by hand") as err:
        tta.load_model("cifar10_resnet20")
    msg = str(err.value)
    assert f"at {dest} " in msg and "Read-only file system" in msg
    assert "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet20-12fca82f.th" in msg
    assert "sha256 12fca82f" in msg


def test_missing_checkpoint_when_home_is_a_file_says_where_to_place_it(tmp_path, monkeypatch):
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    monkeypatch.setenv("TTA_HOME", str(home))
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network tried"))
    with pytest.raises(RuntimeError, match="place the file by hand") as err:
        tta.load_model("cifar10_resnet32")
    assert str(home / "models" / "cifar10" / "resnet32-d509ac18.th") in str(err.value)
    assert "sha256 d509ac18" in str(err.value)


def test_an_empty_tta_home_is_refused_not_taken_as_the_current_directory(monkeypatch):
    monkeypatch.setenv("TTA_HOME", "")
    with pytest.raises(ValueError, match="TTA_HOME is set but empty"):
        tta.load_model("cifar10_resnet20")
    monkeypatch.delenv("TTA_HOME")
    assert tta.tta_home() == pathlib.Path("~/.cache/tta").expanduser()


def test_offline_download_names_the_path_url_and_sha256(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("TTA_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="could not download") as err:
        tta.load_model("cifar10_resnet44")
    msg = str(err.value)
    assert str(tmp_path / "models" / "cifar10" / "resnet44-014dd654.th") in msg
    assert "resnet44-014dd654.th" in msg.split("could not download ")[1] and "sha256 014dd654" in msg
    assert not list((tmp_path / "models" / "cifar10").iterdir())  # no partial file left


# ----------------------------------------------------------------------------------
# Offline: fail at once, not after the hub client's minute of retries
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["clip:ViT-B-16/openai", "timm:resnet18"])
def test_hub_weights_offline_fail_at_once_with_local_advice(spec: str, monkeypatch, tmp_path) -> None:
    import time

    if spec.startswith("clip:"):
        pytest.importorskip("open_clip")
    import tta.models.hub as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # whatever this machine has cached: these weights count as missing
    monkeypatch.setattr(hub, "hub_file_cached", lambda *a, **k: False)
    monkeypatch.setattr(hub, "file_cached", lambda *a, **k: False)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="not in the local cache.*HF_HUB_OFFLINE is set.*model.weights=path"):
        tta.load_model(spec)
    assert time.perf_counter() - t0 < 20


def test_offline_reason_sees_an_unreachable_host(monkeypatch) -> None:
    from tta.models.hub import offline_reason

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # a reserved TLD never resolves
    assert "does not answer" in offline_reason("https://weights.invalid/some/file.bin")
