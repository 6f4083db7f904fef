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
