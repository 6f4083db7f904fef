"""Every entropy-family method on every kind of timm backbone (random weights, small
batches, offline): adapts, predicts finite logits, resets bit-exactly, and freezes
what the official code freezes."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import tta
from tta.methods.params import paper_frozen_modules

from test_methods import same, state

NUM_CLASSES = 10

# (timm architecture, create_model overrides that shrink it, input side, what the
# official SAR/DeYO rule freezes at the top level of the backbone)
FAMILIES = [
    ("resnet10t", {}, 64, {"backbone.layer4"}),                       # BatchNorm convnet
    ("mobilenetv3_small_050", {}, 64, set()),                          # depthwise, BatchNorm
    ("ghostnet_050", {}, 64, {"backbone.blocks.9"}),                  # the official substring "blocks.9"
    ("regnetx_002", {}, 64, set()),
    ("convnext_atto", {}, 64, set()),                                  # LayerNorm2d
    ("vit_tiny_patch16_224", {"img_size": 64}, 64,
     {"backbone.blocks.9", "backbone.blocks.10", "backbone.blocks.11", "backbone.norm"}),
    ("deit_tiny_patch16_224", {"img_size": 64}, 64,
     {"backbone.blocks.9", "backbone.blocks.10", "backbone.blocks.11", "backbone.norm"}),
    ("swin_tiny_patch4_window7_224",
     {"img_size": 64, "window_size": 4, "embed_dim": 24, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 3, 4)},
     64, {"backbone.norm"}),
    ("mixer_s16_224", {"img_size": 64}, 64, {"backbone.norm"}),         # MLP-Mixer
    ("poolformer_s12", {}, 64, set()),                                 # GroupNorm
    ("levit_128s", {"img_size": 64}, 64, set()),                       # BatchNorm over tokens
    ("efficientformer_l1", {"depths": (1, 1, 1, 1)}, 224, {"backbone.norm"}),
]
METHODS = ["norm", "tent", "eta", "eata", "sar", "deyo"]

# Random weights are never confident: open every filter so each method adapts
# (above the maximum entropy ln C; EATA's weight exp(e_margin - H) stays moderate).
ABOVE_MAX_ENTROPY = 2 * math.log(NUM_CLASSES)
OPEN_FILTERS = {
    "eta": dict(e_margin=ABOVE_MAX_ENTROPY, d_margin=2.0),
    "eata": dict(e_margin=ABOVE_MAX_ENTROPY, d_margin=2.0),
    "sar": dict(e_margin=ABOVE_MAX_ENTROPY, reset_constant=None),
    "deyo": dict(deyo_margin=ABOVE_MAX_ENTROPY, plpd_threshold=-2.0),
}


@pytest.fixture(scope="module", params=FAMILIES, ids=[f[0] for f in FAMILIES])
def family(request):
    arch, kwargs, side, frozen = request.param
    torch.manual_seed(0)
    model = tta.load_model(f"timm:{arch}", pretrained=False, num_classes=NUM_CLASSES, **kwargs)
    head = model.backbone.get_classifier()
    if isinstance(head, torch.nn.Linear) and not head.weight.any():
        # timm zero-initialises some heads (MLP-Mixer): constant logits have no
        # entropy gradient, which no trained model has.
        torch.nn.init.normal_(head.weight, std=0.1)
    return model, side, frozen


@pytest.mark.parametrize("name", METHODS)
def test_method_adapts_any_timm_family(name, family):
    model, side, frozen = family
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(4, 3, side, side, generator=g) for _ in range(2)]
    kwargs = dict(OPEN_FILTERS.get(name, {}))
    if name == "eata":
        kwargs.update(fisher_loader=[torch.rand(4, 3, side, side, generator=g)], fisher_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # norm on a model without BatchNorm says so
        method = tta.wrap(copy.deepcopy(model), name, **kwargs)
    source = state(method)
    for x in batches:
        logits = method(x)
        assert logits.shape == (4, NUM_CLASSES) and torch.isfinite(logits).all()
    if name != "norm":
        params = dict(method.model.named_parameters())
        moved = [n for n, _ in method.adapted if not torch.equal(params[n], source["model." + n])]
        assert moved, f"{name} moved no adapted parameter"
    if name in ("sar", "deyo"):
        frozen_all = paper_frozen_modules(method.model)
        outermost = {n for n in frozen_all if not any(n.startswith(f + ".") for f in frozen_all)}
        assert outermost == frozen
        assert method.adapted and not any(n.startswith(tuple(f + "." for f in frozen_all)) for n, _ in method.adapted)
    method.reset()
    after = state(method)
    assert after.keys() == source.keys()
    assert all(same(source[k], after[k]) for k in source), [k for k in source if not same(source[k], after[k])]


@pytest.mark.parametrize("name", ["tent", "eta", "sar", "deyo"])
def test_norm_free_net_is_refused_at_wrap_time(name):
    model = tta.load_model("timm:nf_resnet26", pretrained=False, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=r"nothing to adapt.*no BatchNorm, LayerNorm or GroupNorm.*'source'"):
        tta.wrap(model, name)


@pytest.mark.parametrize("name", ["cotta", "memo"])
def test_cached_attention_biases_follow_the_adapted_weights(name):
    """LeViT (like EfficientFormer and EfficientViT-MSRA) caches its indexed
    attention biases in eval mode. Methods that adapt every weight change them: the
    cache must not keep a stale table, nor an autograd graph the first backward
    frees (a second CoTTA step, or MEMO after a reset, failed)."""
    torch.manual_seed(0)
    model = tta.load_model("timm:levit_128s", pretrained=False, num_classes=NUM_CLASSES, img_size=64)
    method = tta.wrap(model, name, **({"num_views": 2} if name == "cotta" else {"num_views": 4}))
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    first = method(x)
    for _ in range(2):
        method(x)
    method.reset()
    torch.manual_seed(0)
    assert torch.equal(method(x), first)
    if name == "memo":  # image by image
        method(x[:1])
    # an eval forward sees a changed bias table at once
    block = next(m for m in method.model.modules() if hasattr(m, "attention_bias_cache"))
    teacher = getattr(method, "teacher", method.model)
    with torch.no_grad():
        before = teacher(x)
        for m in teacher.modules():
            if hasattr(m, "attention_biases"):
                m.attention_biases.add_(1.0)
        assert not torch.equal(teacher(x), before)
    assert isinstance(block.attention_bias_cache, dict)


# networks as timm builds them, whose classifier is not one layer on pooled features:
# distilled networks (two heads; DeiT's and PiT's on two tokens), a head that pools
# and normalises first (ConvNeXt), and plain ones
SPLIT_NETWORKS = [
    ("resnet10t", {}, 64),
    ("convnext_atto", {}, 64),
    ("vit_tiny_patch16_224", {"img_size": 64}, 64),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64}, 64),
    ("pit_ti_distilled_224", {"img_size": 64}, 64),
    ("levit_128s", {"img_size": 64}, 64),
    ("efficientformer_l1", {"depths": (1, 1, 1, 1)}, 224),
]


@pytest.mark.parametrize("arch,kwargs,side", SPLIT_NETWORKS, ids=[n[0] for n in SPLIT_NETWORKS])
def test_the_feature_split_gives_the_networks_own_prediction(arch, kwargs, side):
    import timm
    from tta.methods.features import classifier_head, pooled_features

    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES, **kwargs).eval()
    x = torch.rand(4, 3, side, side, generator=torch.Generator().manual_seed(0))
    for model in (net, tta.models.ImageClassifier(net, NUM_CLASSES)):  # unpooled and pooled forward_features
        with torch.no_grad():
            features = pooled_features(model, x)
            assert features.dim() == 2 and features.shape[0] == 4
            assert torch.equal(classifier_head(model)(features), model(x))


@pytest.mark.parametrize("name", ["lame", "adacontrast"])
@pytest.mark.parametrize("arch", ["deit_tiny_distilled_patch16_224", "levit_128s", "resnet10t"])
def test_feature_methods_take_timm_networks_as_built_and_distilled_ones(name, arch):
    """LAME and AdaContrast on a timm network itself (forward_features unpooled: a
    shape error before) and on two-headed distilled networks (refused before)."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES,
                            **({} if arch == "resnet10t" else {"img_size": 64}))
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    runs_and_resets_bit_exactly(tta.wrap(net, name, **({"queue_size": 16, "bank_size": 16}
                                                       if name == "adacontrast" else {})), x)


def runs_and_resets_bit_exactly(method, x):
    """Two finite steps on ``x``; after ``reset()`` the first again, bit for bit, and
    the state of before the first."""
    source = state(method)
    torch.manual_seed(1)
    first = method(x)
    assert first.shape == (x.shape[0], NUM_CLASSES) and torch.isfinite(first).all()
    method(x)
    method.reset()
    torch.manual_seed(1)
    assert torch.equal(method(x), first)
    method.reset()
    assert all(same(source[k], v) for k, v in state(method).items())


TORCHVISION_NETWORKS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit_b_16"]


@pytest.mark.parametrize("arch", TORCHVISION_NETWORKS)
def test_a_network_without_timms_split_is_split_at_its_last_linear_layer(arch):
    """torchvision's classifiers (fc, classifier[-1], heads.head): the input of the
    last nn.Linear are the features, the layer the classifier."""
    import torchvision
    from tta.methods.features import classifier_head, pooled_features

    torch.manual_seed(0)
    kwargs = {"image_size": 32, "patch_size": 16, "num_layers": 1, "num_heads": 2, "hidden_dim": 16,
              "mlp_dim": 16} if arch == "vit_b_16" else {}
    net = (torchvision.models.VisionTransformer(num_classes=NUM_CLASSES, **kwargs) if arch == "vit_b_16"
           else getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES)).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = pooled_features(net, x)
        assert features.dim() == 2 and torch.equal(classifier_head(net)(features), net(x))


@pytest.mark.parametrize("name", ["lame", "adacontrast", "rmt", "santa"])
def test_feature_methods_run_on_a_torchvision_network(name):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32, generator=g)
    source = [(torch.rand(10, 3, 32, 32, generator=g), torch.arange(NUM_CLASSES))]
    options = {"lame": {}, "adacontrast": {"queue_size": 16, "bank_size": 16},
               "rmt": {"source_loader": source, "num_warmup_images": 10},
               "santa": {"source_loader": source}}[name]
    runs_and_resets_bit_exactly(tta.wrap(net, name, **options), x)


def test_a_network_whose_output_is_not_its_last_linear_layers_is_refused_by_name():
    class Scaled(torch.nn.Module):  # post-processes its logits
        def __init__(self):
            super().__init__()
            self.body, self.fc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                                     torch.nn.Flatten()), torch.nn.Linear(4, NUM_CLASSES)

        def forward(self, x):
            return 2 * self.fc(self.body(x))

    method = tta.wrap(Scaled(), "lame")
    with pytest.raises(TypeError, match=r"Scaled's output is not its last nn.Linear.*forward_features"):
        method(torch.rand(4, 3, 16, 16))
