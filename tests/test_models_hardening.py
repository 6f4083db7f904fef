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
