"""The CNN models and the ensemble wrapper: registry, shapes, the shared input convention."""

import pytest
import torch

from mnistrec.errors import MnistrecError
from mnistrec.models import Ensemble, create_model, describe_models, model_names


@pytest.mark.parametrize("name", ["cnn-small", "cnn-vgg", "cnn-lite", "cnn-wide", "mlp", "ensemble"])
def test_model_is_registered_and_maps_pixels_to_ten_logits(name):
    assert name in model_names()
    model = create_model(name).eval()
    x = torch.rand(5, 1, 28, 28)
    out = model(x)
    assert out.shape == (5, 10)
    assert torch.isfinite(out).all()
    # One image alone gives the same logits as inside a batch (eval mode: BatchNorm uses running stats).
    assert torch.allclose(model(x[:1]), out[:1], atol=1e-5)


@pytest.mark.parametrize("name", ["cnn-small", "cnn-vgg", "cnn-lite", "cnn-wide"])
def test_normalisation_lives_in_the_model_but_not_in_the_state_dict(name):
    model = create_model(name)
    assert not any("normalize" in key for key in model.state_dict())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_describe_models_counts_parameters_and_flops_and_the_large_cnn_is_larger():
    rows = {row["name"]: row for row in describe_models()}
    assert {"cnn-small", "cnn-vgg", "mlp", "ensemble"} <= set(rows)
    assert rows["cnn-small"]["parameters"] == sum(p.numel() for p in create_model("cnn-small").parameters())
    assert rows["cnn-vgg"]["flops"] > 2 * rows["cnn-small"]["flops"] > 0


def test_ensemble_returns_log_of_the_averaged_member_softmax():
    torch.manual_seed(0)
    ensemble = Ensemble("cnn-small", size=3).eval()
    x = torch.rand(4, 1, 28, 28)
    expected = torch.stack([m(x).softmax(1) for m in ensemble.members]).mean(0)
    assert torch.allclose(ensemble(x).softmax(1), expected, atol=1e-6)
    assert torch.allclose(ensemble(x).exp().sum(1), torch.ones(4), atol=1e-5)


def test_unknown_model_lists_the_choices():
    with pytest.raises(MnistrecError, match="unknown model 'resnet9000'; choose from: cnn-lite, cnn-small, cnn-vgg, cnn-wide"):
        create_model("resnet9000")


def test_strided_cnns_start_at_14x14_and_take_width_overrides():
    """The strided-stem CNNs never hold a 28x28 activation (that is where their speed comes from),
    and their stage widths can be overridden by name like any registered model's arguments."""
    model = create_model("cnn-lite").eval()
    sizes = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[-2:])))
             for m in model.features]
    model(torch.rand(2, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    assert sizes[0] == (14, 14) and sizes[-1] == (7, 7) and max(sizes) == (14, 14)
    wider = create_model("cnn-lite", widths_7=(128,))
    assert wider.classifier.in_features == 2 * 128
    rows = {row["name"]: row for row in describe_models()}
    assert rows["cnn-wide"]["parameters"] > 2 * rows["cnn-lite"]["parameters"]
