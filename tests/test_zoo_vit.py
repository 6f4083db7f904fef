"""The zoo's LayerNorm model: a timm ViT config for 32x32 images, ``zoo:vit_tiny_ln``,
and what BatchNorm-only adaptation does on models without BatchNorm."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import tta
from tta.models import zoo

timm = pytest.importorskip("timm")


def test_cifar_vit_is_a_timm_model_with_layer_norm_only():
    import tta.models.timm_cifar  # noqa: F401

    assert "tta_vit_tiny_patch4_cifar" in timm.list_models("tta_vit*")
    net = timm.create_model("tta_vit_tiny_patch4_cifar")
    assert net.patch_embed.num_patches == 64 and net.num_prefix_tokens == 0
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert timm.create_model("tta_vit_tiny_patch4_cifar", num_classes=3)(torch.rand(1, 3, 32, 32)).shape == (1, 3)
    norms = {type(m) for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm))}
    assert norms and all(issubclass(t, nn.LayerNorm) for t in norms)
    buf = io.BytesIO()
    torch.save({k: v.half() for k, v in net.state_dict().items()}, buf)
    assert buf.tell() <= 8e6  # the zoo's size limit for a checkpoint
    with pytest.raises(ValueError, match="no weights"):
        timm.create_model("tta_vit_tiny_patch4_cifar", pretrained=True)


def test_zoo_vit_architecture_builds_without_a_checkpoint():
    model = tta.load_model("zoo:vit_tiny_ln", pretrained=False)
    assert model.input_size == (32, 32) and model.num_classes == 10
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 10)
    assert "vit_tiny_ln" in zoo.list_zoo("vit*")


def test_norm_warns_on_a_model_without_batch_norm():
    torch.manual_seed(0)
    gn = tta.models.CifarResNet(20, norm="gn")
    with pytest.warns(UserWarning, match="no BatchNorm") as record:
        tta.wrap(gn, "norm")
    assert record[0].filename == __file__  # names the caller's line, not tta's internals
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tta.wrap(tta.models.CifarResNet(20), "norm")  # BatchNorm: statistics to adapt, no warning
        tta.wrap(tta.models.CifarResNet(20, norm="gn"), "tent")  # trains the GN affines: no warning


def test_layer_norm_vit_adapts_its_layer_norms_with_deyo():
    torch.manual_seed(0)
    model = tta.load_model("zoo:vit_tiny_ln", pretrained=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = tta.wrap(model, "deyo", lr=1e-2, plpd_threshold=-1.0, deyo_margin=10.0)
    names = {n for n, _ in adapted.adapted}
    assert names and all("norm" in n.rsplit(".", 2)[-2] for n in names)
    # The official rule freezes blocks 9-11 and the final `norm`: a 6-block ViT with
    # a pooled-feature norm (`fc_norm`) freezes nothing of its blocks.
    assert any(".blocks.5." in n for n in names) and any("fc_norm" in n for n in names)
    last = {n for n, _ in tta.wrap(copy.deepcopy(model), "deyo", skip_modules="last_stage").adapted}
    assert not any(".blocks.5." in n or "fc_norm" in n for n in last)
    assert any(".blocks.4." in n for n in last)
    adapted(torch.rand(8, 3, 32, 32))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= names


VIT_CKPT = zoo.bundled_dir() / "vit_tiny_ln.pt"


@pytest.mark.skipif(not VIT_CKPT.is_file(), reason="zoo:vit_tiny_ln is not trained (benchmarks/zoo/train.py)")
def test_zoo_vit_accuracy_and_batch_independence(cifar_test_images):
    model = tta.load_model("zoo:vit_tiny_ln")
    x, y = cifar_test_images
    info = zoo.zoo_info("vit_tiny_ln")
    with torch.no_grad():
        logits = model(x)
        acc = 100 * (logits.argmax(1) == y).float().mean().item()
        assert torch.allclose(model(x[:1]), logits[:1], atol=1e-4)
    assert abs(acc - info["clean_accuracy"]) < 2.5  # 2000 of the 10k images
