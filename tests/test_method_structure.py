"""The pieces every method shares: declared step records, the base class's
``skip_modules`` option, the papers' margins as class constants, the SAM step,
and CLIP methods that check their model by what it can do."""

import copy
import math

import pytest
import torch
from torch import nn

import tta
from tta.methods import method_class
from tta.methods.clip_views import CLIP_INTERFACE, check_clip_classifier
from tta.methods.optim import sam_ascent, undo_sam_ascent
from tta.methods.params import last_stage_prefixes, select_norm_params

from test_methods import IMAGE_METHODS, small_options



@pytest.mark.parametrize("name", IMAGE_METHODS)
def test_a_step_records_exactly_its_declared_fields(name, noisy_batch):
    method = tta.wrap(tta.load_model("cifar10_resnet20"), name, **small_options(name, noisy_batch))
    method(noisy_batch[:16])
    record = method.last_record
    assert isinstance(record, method.record_type)
    assert list(record.to_dict()) == method.record_type.columns()
    assert all(not isinstance(v, torch.Tensor) for v in record.to_dict().values())


def test_method_records_declare_their_own_columns():
    assert method_class("sar").record_type.columns()[-3:] == ["num_reliable", "ema", "num_resets"]
    assert method_class("deyo").record_type.columns()[-1] == "num_confident"
    assert method_class("eta").record_type.columns()[-1] == "num_reliable"
    assert method_class("tent").record_type is tta.StepRecord


def test_skip_modules_is_an_option_of_every_norm_affine_method(resnet20):
    assert tta.method_defaults("tent")["skip_modules"] == "none"
    assert tta.method_defaults("sar")["skip_modules"] == "paper"
    frozen = last_stage_prefixes(resnet20)
    method = tta.wrap(resnet20, "tent", skip_modules="last_stage")
    names = [n for n, _ in method.adapted]
    assert names == [n for n, _ in select_norm_params(resnet20, frozen)]
    assert names and not any(n.startswith(tuple(frozen)) for n in names)


def test_skip_modules_names_that_are_no_module_are_refused_with_the_close_ones(resnet20):
    """A name of the bare network ('layer3') on a tta classifier, whose modules start
    with 'backbone.', froze nothing, silently."""
    with pytest.raises(ValueError, match=r"no module 'layer3'; did you mean 'backbone.layer3'"):
        tta.wrap(copy.deepcopy(resnet20), "tent", skip_modules=["layer3"])
    with pytest.raises(TypeError, match="skip_modules must be .* a list of module names, got 3"):
        tta.wrap(copy.deepcopy(resnet20), "tent", skip_modules=3)
    names = [n for n, _ in tta.wrap(resnet20, "tent", skip_modules=["backbone.layer3"]).adapted]
    assert names and not any(n.startswith("backbone.layer3.") for n in names)


@pytest.mark.parametrize("name, why", [("source", "takes no gradient steps"),
                                       ("tpt", "chooses its own parameters")])
def test_skip_modules_is_refused_where_it_would_change_nothing(name, why):
    assert "skip_modules" not in tta.method_defaults(name)
    with pytest.raises(TypeError, match=why):
        tta.wrap(nn.Identity(), name, skip_modules="last_stage")


def test_margins_left_as_none_are_the_class_constants_fraction_of_ln_c(resnet20):
    method = tta.wrap(resnet20, "deyo")
    assert method.margin_fractions == {"deyo_margin": 0.5, "margin_e0": 0.4}
    assert method.margin("deyo_margin", 10) == 0.5 * math.log(10)
    method.deyo_margin = 1.25
    assert method.margin("deyo_margin", 10) == 1.25


def test_sam_ascent_moves_by_rho_along_the_gradient_and_back():
    params = [nn.Parameter(torch.tensor([3.0, 0.0])), nn.Parameter(torch.tensor([4.0]))]
    for p in params:
        p.grad = p.detach().clone()  # gradient (3, 0, 4): norm 5
    before = [p.detach().clone() for p in params]
    offsets = sam_ascent(params, rho=0.5)
    torch.testing.assert_close(offsets[0], torch.tensor([0.3, 0.0]))
    torch.testing.assert_close(params[1].detach(), torch.tensor([4.4]))
    undo_sam_ascent(params, offsets)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_sam_ascent_divides_out_a_gradient_scale_and_ignores_overflow():
    param = nn.Parameter(torch.tensor([3.0, 4.0]))
    param.grad = torch.tensor([3.0, 4.0]) * 1024
    offsets = sam_ascent([param], rho=1.0, grad_scale=torch.tensor(1024.0))
    torch.testing.assert_close(offsets[0], torch.tensor([0.6, 0.8]))
    param.grad = torch.tensor([float("inf"), 1.0])
    offsets = sam_ascent([param], rho=1.0, grad_scale=torch.tensor(1024.0))
    assert torch.equal(offsets[0], torch.zeros(2))


def test_clip_methods_take_any_model_with_the_clip_interface_and_name_what_is_missing():
    class LooksLikeCLIP(nn.Module):
        classnames, ctx, logit_scale = ["a", "b"], None, torch.tensor(1.0)
        num_classes = 2

        def use_prompt(self, ctx_init): ...
        def text_features(self): ...
        def encode_image(self, x): ...
        def logits(self, image_features, text_features=None): ...

    check_clip_classifier(LooksLikeCLIP(), "tpt")  # no error: it has everything
    with pytest.raises(TypeError, match="has no " + ", ".join(CLIP_INTERFACE)):
        check_clip_classifier(nn.Linear(2, 2), "tpt")
