import importlib.util

import pytest
import torch

import tta


def test_import_tta_needs_no_optional_extra():
    import subprocess
    import sys

    code = (
        "import sys, tta; bad = [m for m in ('hydra', 'open_clip', 'matplotlib', 'pandas') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_list_methods_has_the_entropy_family():
    assert {"source", "norm", "tent", "eta", "eata", "sar", "deyo"} <= set(tta.list_methods())
    assert tta.list_methods("e*") == ["eata", "eta"]


def test_unknown_method_suggests_close_match(resnet20):
    with pytest.raises(KeyError, match="did you mean 'tent'"):
        tta.wrap(resnet20, "tnet")


def test_names_that_are_no_string_are_named_with_the_fix():
    """A method or model given as something else than its name failed deep inside
    the lookup ("'int' object is not iterable", "'Sequential' object has no
    attribute 'partition'")."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match=r"takes the model first, then the method's name: tta.wrap\(model, 'tent'\)"):
        tta.wrap("tent", net)
    with pytest.raises(TypeError, match=r"method's name, not its class: tta.wrap\(model, 'tent'\)"):
        tta.wrap(net, tta.methods.method_class("tent"))
    with pytest.raises(TypeError, match="a method is looked up by its name, a string, got int 3"):
        tta.method_defaults(3)
    with pytest.raises(TypeError, match="load_model takes a model's name.*got Sequential.*pass it to tta.wrap"):
        tta.load_model(net)


def test_unknown_hyperparameter_suggests_close_match(resnet20):
    with pytest.raises(TypeError, match="did you mean 'e_margin'"):
        tta.wrap(resnet20, "eta", e_margn=0.3)


@pytest.fixture
def scratch_method_name():
    """A method name registered only for the test: other tests (the bench's
    one-YAML-per-method check) must not see it afterwards."""
    from tta.methods.registry import _METHODS

    yield "_test_identity"
    _METHODS._entries.pop("_test_identity", None)


def test_register_method_decorator_and_wrap(scratch_method_name):
    from tta import StepRecord, TTAMethod

    @tta.register_method("_test_identity")
    class Identity(TTAMethod):
        has_optimizer = False
        batch_stats = False

        def __init__(self, model, *, scale: float = 1.0, **kw):
            super().__init__(model, **kw)
            self.scale = scale

        def forward_and_adapt(self, x):
            return self.model(x) * self.scale, StepRecord(num_samples=x.shape[0])

    assert "_test_identity" in tta.list_methods()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    wrapped = tta.wrap(model, "_test_identity", scale=2.0)
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(wrapped(x), model(x) * 2)
    assert tta.method_defaults("_test_identity")["scale"] == 1.0
    with pytest.raises(ValueError, match="already registered"):
        tta.register_method("_test_identity")(type("Other", (TTAMethod,), {}))


def test_method_defaults_are_the_papers():
    tent = tta.method_defaults("tent")
    assert (tent["optimizer"], tent["lr"]) == ("adam", 1e-3)
    eata = tta.method_defaults("eata")
    assert (eata["d_margin"], eata["fisher_alpha"], eata["e_margin"]) == (0.05, 2000.0, None)
    deyo = tta.method_defaults("deyo")
    assert (deyo["plpd_threshold"], deyo["patch_len"], deyo["aug_type"]) == (0.2, 4, "patch")
    assert tta.method_defaults("sar")["rho"] == 0.05


def test_list_models_and_unknown_model():
    assert "cifar10_resnet20" in tta.list_models()
    # every family lists its models (timm's and open_clip's own names; they were [])
    assert "timm:resnet50" in tta.list_models("timm:resnet*") and "timm:vit_base_patch16_224" not in \
        tta.list_models("timm:resnet*")
    assert "timm:resnet50.a1_in1k" in tta.list_models("timm:resnet50.*")
    if importlib.util.find_spec("open_clip") is not None:
        assert "clip:ViT-B-16/openai" in tta.list_models("clip:ViT-B-16/*")
    assert "zoo:resnet20_bn_jpeg" in tta.list_models("zoo:*")
    with pytest.raises(KeyError, match="did you mean .*'cifar10_resnet20'"):
        tta.load_model("cifar10_resnet2O")


@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(lr=0.0), dict(optimizer="rmsprop"), dict(steps=0)])
def test_invalid_hyperparameters_raise(resnet20, bad):
    with pytest.raises(ValueError):
        tta.wrap(resnet20, "tent", **bad)
