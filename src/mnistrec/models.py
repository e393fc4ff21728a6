"""Model registry: every model is created by name with keyword arguments.

Convention shared by every model here: input is ``float32 [N, 1, 28, 28]`` with
pixels in [0, 1] (ink = 1), output is ``[N, 10]`` logits. The MNIST
normalisation ``(x - 0.1307) / 0.3081`` happens *inside* the model, so a
checkpoint, an ONNX export and the web app all feed the same raw pixels and can
never disagree about it. The constants are plain attributes, not buffers, so a
model's ``state_dict`` keys stay exactly those of the seed notebook.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .errors import MnistrecError

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

#: The most parameters a model may have (counted on the ``meta`` device, before any allocation).
#: 50 M float32 parameters are 200 MB; the largest model shipped here has about 0.6 M.
MAX_PARAMETERS = 50_000_000
#: The most members an ensemble may have.
MAX_ENSEMBLE_SIZE = 64


class Normalize(nn.Module):
    """``(x - mean) / std`` with constants that are not saved in the state_dict."""

    def __init__(self, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> None:
        super().__init__()
        self.mean, self.std = float(mean), float(std)
        # True while the training loop feeds data it normalised once, up front, with this module
        # (see mnistrec.training.loop); never saved, and False everywhere else.
        self.inputs_normalised = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inputs_normalised:
            return x
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


class SeedMLP(nn.Module):
    """The seed notebook's ``MNIST_model0``: 784 -> 512 -> 256 -> 10 with ReLU.

    Layer names (``layer_1`` … ``layer_3``) match the seed so its bare
    ``state_dict`` files load unchanged.
    """

    def __init__(self, hidden1: int = 512, hidden2: int = 256, num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.layer_1 = nn.Linear(28 * 28, hidden1)
        self.layer_2 = nn.Linear(hidden1, hidden2)
        self.layer_3 = nn.Linear(hidden2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x).reshape(x.shape[0], 28 * 28)
        x = torch.relu(self.layer_1(x))
        x = torch.relu(self.layer_2(x))
        return self.layer_3(x)


@dataclass(frozen=True)
class Arg:
    """The accepted values of one model keyword argument: a number in ``[low, high]``,
    a tuple of at most ``max_len`` such integers, a registered model name, or a dict of a member's kwargs."""

    kind: str  # "int", "float", "ints", "model" or "kwargs"
    low: float = 0
    high: float = 0
    max_len: int = 0


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[..., nn.Module]
    description: str
    bounds: dict[str, Arg] = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, description: str, bounds: dict[str, Arg] | None = None,
                   ) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make ``factory`` available as ``create_model(name, **kwargs)``.

    ``bounds`` declares every keyword argument a checkpoint may set and its range;
    anything else is refused before a single layer is built.
    """

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelSpec(name, factory, description, dict(bounds or {}))
        return factory

    return decorate


_CLASSES = {"num_classes": Arg("int", 10, 10)}  # the API, the page and the metrics all assume ten digits
register_model("mlp", "the seed's MLP 784-512-256-10 with ReLU",
               {"hidden1": Arg("int", 1, 16384), "hidden2": Arg("int", 1, 16384), **_CLASSES})(SeedMLP)


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (no bias: BatchNorm has one) -> BatchNorm -> ReLU; size-preserving at stride 1."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def global_avg_max_pool(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W] -> [N, 2C]``: the average sees the whole digit, the max its strongest stroke."""
    return torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)


class SmallCNN(nn.Module):
    """A small fast CNN: three conv-BN-ReLU-maxpool blocks (28 -> 14 -> 7 -> 3) and one linear layer.

    Sized for a 2-core CPU: about 3 MFLOPs per image, so an epoch of 60,000
    images takes seconds, yet with augmentation it passes 99.5%.
    """

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize()
        w = width
        self.features = nn.Sequential(
            _conv_bn(1, w, 5), nn.MaxPool2d(2),  # 14x14
            _conv_bn(w, 2 * w), nn.MaxPool2d(2),  # 7x7
            _conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),  # 3x3
        )
        self.classifier = nn.Linear(4 * w * 3 * 3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        return self.classifier(torch.flatten(x, 1))


class VGGCNN(nn.Module):
    """A larger VGG-style CNN with BatchNorm: two conv-conv-pool stages, a 3x3 conv stage, global pooling.

    28x28 -> (2 convs) -> 14x14 -> (2 convs) -> 7x7 -> (1 conv) -> global average
    and max pooling -> dropout -> linear. The kind of network that reaches
    99.7%+ alone with augmentation.
    """

    def __init__(self, width: int = 16, dropout: float = 0.2, num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize()
        w = width
        self.features = nn.Sequential(
            _conv_bn(1, w), _conv_bn(w, w), nn.MaxPool2d(2),  # 14x14
            _conv_bn(w, 2 * w), _conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),  # 7x7
            _conv_bn(2 * w, 4 * w),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * 4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = global_avg_max_pool(self.features(self.normalize(x)))
        return self.classifier(self.dropout(x))


class StridedCNN(nn.Module):
    """A CNN that spends its compute at 14x14 and 7x7: a stride-2 5x5 stem, conv stages, global pooling.

    28x28 -> 5x5 conv, stride 2 -> 14x14 -> convs -> max-pool -> 7x7 -> convs ->
    global average and max pooling -> linear. On a CPU, small CNNs are bound
    by the elementwise work (BatchNorm, ReLU, pooling and their gradients) on
    full-resolution activations, not by the convolutions' FLOPs; starting at
    14x14 removes that work, so the same time buys about twice the parameters
    of ``cnn-small`` (which starts with a full 28x28 stage).
    """

    def __init__(self, stem: int = 24, widths_14: tuple[int, ...] = (48,), widths_7: tuple[int, ...] = (96,),
                 dropout: float = 0.0, num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize()
        layers: list[nn.Module] = [_conv_bn(1, stem, 5, stride=2)]
        channels = stem
        for width in widths_14:
            layers.append(_conv_bn(channels, width))
            channels = width
        layers.append(nn.MaxPool2d(2))
        for width in widths_7:
            layers.append(_conv_bn(channels, width))
            channels = width
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = global_avg_max_pool(self.features(self.normalize(x)))
        return self.classifier(self.dropout(x))


_WIDTH = Arg("int", 1, 2048)
_DROPOUT = Arg("float", 0.0, 1.0)
_STRIDED = {"stem": _WIDTH, "widths_14": Arg("ints", 1, 2048, 8), "widths_7": Arg("ints", 1, 2048, 8),
            "dropout": _DROPOUT, **_CLASSES}
register_model("cnn-small", "small fast CNN: 3 conv-BN-ReLU-pool blocks, 16-32-64 channels",
               {"width": _WIDTH, **_CLASSES})(SmallCNN)
register_model("cnn-vgg", "VGG-style CNN with BatchNorm: 5 convs 16-16-32-32-64, avg+max pooling, dropout",
               {"width": _WIDTH, "dropout": _DROPOUT, **_CLASSES})(VGGCNN)


@register_model("cnn-lite", "strided-stem CNN: 5x5/2 stem 16, convs 32 @14x14, 64-64 @7x7, avg+max pooling", _STRIDED)
def cnn_lite(**kwargs: Any) -> StridedCNN:
    return StridedCNN(**{"stem": 16, "widths_14": (32,), "widths_7": (64, 64), **kwargs})


@register_model("cnn-wide", "strided-stem CNN: 5x5/2 stem 32, convs 48 @14x14, 96-96 @7x7, avg+max pooling", _STRIDED)
def cnn_wide(**kwargs: Any) -> StridedCNN:
    return StridedCNN(**{"stem": 32, "widths_14": (48,), "widths_7": (96, 96), **kwargs})


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def _check_value(name: str, key: str, value: Any, arg: Arg) -> None:
    """Raise a one-line :class:`MnistrecError` unless ``value`` is what ``arg`` accepts."""
    where = f"model {name!r}: {key}"
    if arg.kind == "model":
        if not isinstance(value, str) or value not in _REGISTRY or value == name:
            raise MnistrecError(f"{where}={value!r} is not a registered model other than {name!r}")
    elif arg.kind == "kwargs":
        if not isinstance(value, dict):
            raise MnistrecError(f"{where} must be a dict, not {type(value).__name__}")
    elif arg.kind == "ints":
        if not isinstance(value, (list, tuple)) or len(value) > arg.max_len:
            raise MnistrecError(f"{where} must be a list of at most {arg.max_len} integers")
        for item in value:
            _check_value(name, key + "[]", item, Arg("int", arg.low, arg.high))
    else:
        numeric = (int, float) if arg.kind == "float" else (int,)
        if isinstance(value, bool) or not isinstance(value, numeric):
            raise MnistrecError(f"{where} must be {'a number' if arg.kind == 'float' else 'an integer'}, not {value!r:.40}")
        if not (math.isfinite(value) and arg.low <= value <= arg.high):
            raise MnistrecError(f"{where}={value!r:.40} is out of range ({arg.low:g} to {arg.high:g})")


def validate_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Check ``kwargs`` against the bounds that model ``name`` declared (an ensemble's member's too).

    Cheap and allocation-free: it runs before anything is built, so a checkpoint
    asking for a 200,000-wide layer or a million-member ensemble is refused at once.
    """
    if name not in _REGISTRY:
        raise MnistrecError(f"unknown model {name!r}; choose from: {', '.join(model_names())}")
    if not isinstance(kwargs, dict):
        raise MnistrecError(f"model {name!r}: arguments must be a dict, not {type(kwargs).__name__}")
    bounds = _REGISTRY[name].bounds
    for key, value in kwargs.items():
        if key not in bounds:
            raise MnistrecError(f"bad arguments for model {name!r}: unknown argument {str(key)[:40]!r} "
                                f"(accepted: {', '.join(bounds) or 'none'})")
        _check_value(name, key, value, bounds[key])
    if "member_kwargs" in kwargs:
        validate_kwargs(kwargs.get("member", "cnn-wide"), kwargs["member_kwargs"])


def meta_model(name: str, **kwargs: Any) -> nn.Module:
    """The model built on the ``meta`` device: shapes and parameter count, no memory for weights.

    Validates ``kwargs`` first and refuses a model over :data:`MAX_PARAMETERS`.
    """
    validate_kwargs(name, kwargs)
    try:
        with torch.device("meta"):
            model = _REGISTRY[name].factory(**kwargs)
    except TypeError as exc:
        raise MnistrecError(f"bad arguments for model {name!r}: {exc}") from None
    count = count_parameters(model)
    if count > MAX_PARAMETERS:
        raise MnistrecError(f"model {name!r} with these arguments would have {count:,} parameters, "
                            f"over the limit of {MAX_PARAMETERS:,}")
    return model


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name; unknown names list the choices.

    The arguments are checked against the model's declared bounds and its size is
    counted on the ``meta`` device first, so nothing large is ever allocated by mistake.
    """
    meta_model(name, **kwargs)
    try:
        return _REGISTRY[name].factory(**kwargs)
    except TypeError as exc:
        raise MnistrecError(f"bad arguments for model {name!r}: {exc}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: nn.Module) -> int:
    """Forward FLOPs for one 28x28 image, counted by PyTorch's own FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    model.train(was_training)
    return int(counter.get_total_flops())


def describe_models() -> list[dict[str, Any]]:
    """One row per registered model (default arguments): name, parameters, FLOPs, description."""
    rows = []
    for name in model_names():
        model = create_model(name)
        rows.append(
            {
                "name": name,
                "parameters": count_parameters(model),
                "flops": flops_per_image(model),
                "description": _REGISTRY[name].description,
            }
        )
    return rows


class Ensemble(nn.Module):
    """``size`` copies of a registered model whose softmax outputs are averaged.

    Returns the log of the averaged probabilities, so it is a drop-in "logits"
    model: ``argmax`` is the ensemble's vote and ``softmax`` gives back the mean
    probabilities. The ``ensemble`` recipe trains the members with different
    seeds and saves them as one checkpoint of this model.
    """

    def __init__(self, member: str = "cnn-wide", size: int = 3, member_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if member == "ensemble":
            raise MnistrecError("an ensemble cannot contain ensembles")
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_ENSEMBLE_SIZE:
            raise MnistrecError(f"model 'ensemble': size={size!r:.40} is out of range (1 to {MAX_ENSEMBLE_SIZE})")
        self.members = nn.ModuleList(create_model(member, **(member_kwargs or {})) for _ in range(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = torch.stack([m(x).float().softmax(1) for m in self.members]).mean(0)
        return probabilities.clamp_min(1e-12).log()


register_model("ensemble", "averaged softmax of N trained models (written by the ensemble recipe)",
               {"member": Arg("model"), "size": Arg("int", 1, MAX_ENSEMBLE_SIZE), "member_kwargs": Arg("kwargs")})(Ensemble)
