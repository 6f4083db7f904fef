import os
import pickle
from pathlib import Path

import pytest
import torch

import tta
from tta.models import load_checkpoint


def test_resnet20_clean_accuracy(cifar_test_images):
    x, y = cifar_test_images
    model = tta.load_model("cifar10_resnet20")
    with torch.no_grad():
        acc = (model(x[:1000]).argmax(1) == y[:1000]).float().mean().item()
    assert 0.77 < acc < 0.86  # ~81% on the shared JPEG split
    assert model.num_classes == 10 and model.input_size == (32, 32)


@pytest.mark.parametrize("depth", [32, 44, 56])
def test_deeper_cifar_resnets_load(depth, cifar_test_images):
    x, y = cifar_test_images
    model = tta.load_model(f"cifar10_resnet{depth}")
    with torch.no_grad():
        acc = (model(x[:300]).argmax(1) == y[:300]).float().mean().item()
    assert acc > 0.75


def test_weights_path_and_mismatch(tmp_path):
    good = tta.load_model("cifar10_resnet20")
    path = tmp_path / "r20.pt"
    torch.save({"state_dict": good.backbone.state_dict()}, path)
    again = tta.load_model("cifar10_resnet20", weights=path)
    for a, b in zip(good.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not match"):
        tta.load_model("cifar10_resnet32", weights=path)
    junk = tmp_path / "junk.th"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.th is not a checkpoint"):
        tta.load_model("cifar10_resnet20", weights=junk)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_state_dict_of_a_loaded_model_is_a_checkpoint(tmp_path, noisy_batch):
    model = tta.load_model("cifar10_resnet20")
    torch.save(model.state_dict(), tmp_path / "saved.pt")  # keys start with backbone.
    again = tta.load_model("cifar10_resnet20", weights=tmp_path / "saved.pt")
    with torch.no_grad():
        assert torch.equal(again(noisy_batch[:4]), model(noisy_batch[:4]))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.th"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": _Exploit(marker)}, fh)
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_timm_model_normalises_inside():
    model = tta.load_model("timm:resnet18", pretrained=False, num_classes=7)
    assert model.num_classes == 7 and model.input_size == (224, 224)
    assert model.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 7)
    with pytest.raises(KeyError, match=r"did you mean.*list them with tta.list_models\('timm:\*'\)"):
        tta.load_model("timm:resnet5O", pretrained=False)
    # a deprecated name timm still builds (as its successor, the 21k-class head)
    assert tta.load_model("timm:vit_tiny_patch16_224_in21k", pretrained=False).num_classes == 21843
    # a transformer built for another size says so (timm's config keeps 224)
    assert tta.load_model("timm:vit_tiny_patch16_224", pretrained=False, img_size=96).input_size == (96, 96)


def test_corrupted_cached_checkpoint_is_reported(tmp_path, monkeypatch):
    cache = tmp_path / "models" / "cifar10"
    cache.mkdir(parents=True)
    good = tta.tta_home() / "models" / "cifar10" / "resnet20-12fca82f.th"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    (cache / good.name).write_bytes(bytes(data))
    monkeypatch.setenv("TTA_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="corrupted") as err:
        tta.load_model("cifar10_resnet20")
    assert "Delete it" in str(err.value)
    assert "pretrained_models/resnet20-12fca82f.th" in str(err.value)  # where to get it by hand


def test_a_model_family_is_one_registration(monkeypatch):
    from tta.models import registry

    monkeypatch.setattr(registry._FAMILIES, "_entries", dict(registry._FAMILIES._entries))
    calls = []

    def load(rest, *, weights=None, width=1):
        calls.append((rest, weights, width))
        return torch.nn.Linear(width, 2).train()

    tta.models.register_model_family("toy", load, lambda pattern: ["a", "b"] if pattern == "*" else [])
    assert not tta.load_model("toy:a", width=3).training  # load_model's eval() applies to every family
    assert calls == [("a", None, 3)]
    assert tta.list_models("toy:*") == tta.list_models("toy:") == ["toy:a", "toy:b"]
    with pytest.raises(ValueError, match="already registered"):
        tta.models.register_model_family("toy", load)


def test_unknown_names_list_the_known_prefixes():
    with pytest.raises(KeyError, match=r"unknown model family 'tim:'.*did you mean 'timm:resnet18'\?"
                                       r".*Known prefixes: clip:, timm:, zoo:"):
        tta.load_model("tim:resnet18")
    with pytest.raises(KeyError, match="did you mean .*'cifar10_resnet20'.*prefixes clip:, timm:, zoo:"):
        tta.load_model("cifar10_resnet2O")
    with pytest.raises(ValueError, match="has a ':'"):
        tta.models.register_model("a:b")
    with pytest.raises(KeyError, match="unknown model family 'tim:'"):
        tta.list_models("tim:*")
    with pytest.raises(TypeError, match="pattern must be a str"):
        tta.list_models(None)


def test_registration_needs_a_name_and_a_loader_a_module(monkeypatch):
    from tta.models import registry

    monkeypatch.setattr(registry._MODELS, "_entries", dict(registry._MODELS._entries))
    with pytest.raises(TypeError, match=r"registered under a non-empty name.*@register_model\('name'\)"):
        @tta.register_model  # the name left out
        def net(weights=None):
            return torch.nn.Identity()
    with pytest.raises(TypeError, match="non-empty name, got ''"):
        tta.register_model("")
    tta.register_model("returns_none")(lambda weights=None: None)
    with pytest.raises(TypeError, match="loader of model 'returns_none' returned NoneType, not an nn.Module"):
        tta.load_model("returns_none")
