"""`captioner export --format onnx`: a model folder to onnxruntime graphs (onnx_backend.py runs them).

The graphs come from torch.onnx's dynamo exporter (torch.export, then onnxscript): the default and
maintained one in torch 2.13, and it fails loudly where a shape would be baked in, where the older
TorchScript exporter (which warns it will be removed) traces shape arithmetic into constants. Axes
of the state that grow from step to step (a key/value cache's length) are found by stepping twice
and comparing shapes, and stay dynamic like the batch.

Each graph is stamped with the sha256 of the weights it was exported from (onnx_backend.WEIGHTS_KEY).

The export checks itself before the folder appears: the same images through PyTorch and onnxruntime
must give the same captions, and log-probabilities within TOLERANCE along them. `quantize="int8"`
then stores the decoder's weights as int8 (onnxruntime's dynamic quantization); its cost in agreement
is measured and recorded, not required (docs/RESULTS.md has it on Flickr8k).
"""
from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .atomic import replace_folder
from .encoders import Encoder, image_transforms
from .extras import install_hint
from .models.base import CaptionDecoder, State
from .models.files import BESIDE_WEIGHTS, read_model_json, weights_sha256, write_model_json
from .onnx_backend import CONCEPT_HEAD, GRAPHS, WEIGHTS_KEY, require_onnxruntime
from .pipeline import Captioner

QUANTIZE = ("none", "int8")
# Largest difference allowed between a PyTorch and an onnxruntime float32 log-probability: the two
# libraries sum in different orders, which moves float32 results by about 1e-5 here.
TOLERANCE = 1e-3
EXPORT_ROWS = 5  # batch of the example inputs; any size other than 1 keeps the batch axis dynamic


def require_exporter() -> None:
    """The exporter's dependencies: onnx, and onnxscript, which torch.onnx's dynamo exporter builds graphs with."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(f"exporting to ONNX needs onnx and onnxscript ({err.name} is missing): "
                          f"{install_hint('onnx')}") from err


class _Regions(nn.Module):
    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder.regions(images)


class _Init(nn.Module):
    def __init__(self, decoder: CaptionDecoder, names: list[str]) -> None:
        super().__init__()
        self.decoder, self.names = decoder, names

    def forward(self, features: Tensor, memory: Tensor | None = None) -> tuple[Tensor, ...]:
        # memory: a retrieval decoder's retrieved captions, its init graph's second input
        init: Callable[..., State] = self.decoder.init_state  # a retrieval decoder's takes the memory too
        state = init(features, memory) if memory is not None else init(features)
        return tuple(state[n] for n in self.names)


class _Step(nn.Module):
    def __init__(self, decoder: CaptionDecoder, names: list[str], changed: list[str]) -> None:
        super().__init__()
        self.decoder, self.names, self.changed = decoder, names, changed

    def forward(self, words: Tensor, state: list[Tensor]) -> tuple[Tensor, ...]:
        logprobs, new_state, alpha = self.decoder.step(words, dict(zip(self.names, state)))
        return (logprobs, *(new_state[n] for n in self.changed), alpha)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic_shapes: Any, weights: str) -> None:
    """One graph with the dynamo exporter (torch.export + onnxscript), its origin in the metadata."""
    import onnx

    with warnings.catch_warnings():  # the exporter's own notes (deprecations, torchvision absent) are noise here
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(module.eval(), args, dynamo=True, verbose=False, input_names=inputs,
                                    output_names=outputs, dynamic_shapes=dynamic_shapes)
    assert program is not None  # dynamo=True returns the program
    program.save(str(path))
    _stamp(path, weights)
    onnx.checker.check_model(str(path))


def _stamp(path: Path, weights: str) -> None:
    """Record in a graph's metadata which weights it came from."""
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {WEIGHTS_KEY: weights})
    onnx.save(model, str(path))


def _varying_dims(before: State, after: State) -> dict[str, set[int]]:
    """Per state tensor, the dimensions (besides the batch) whose size changed from one step to the next,
    e.g. a key/value cache's length: they become dynamic axes too."""
    return {n: {d for d in range(1, v.dim()) if v.shape[d] != after[n].shape[d]} for n, v in before.items()}


def export_encoder(encoder: Encoder, out: Path, weights: str) -> Tensor:
    """Write encoder.onnx into `out`; return the features of the example images, for export_decoder."""
    images = torch.rand(EXPORT_ROWS, 3, encoder.image_size, encoder.image_size,
                        generator=torch.Generator().manual_seed(0)) * 2 - 1
    _export(_Regions(encoder), (images,), out / GRAPHS["encoder"], ["images"], ["features"],
            ({0: torch.export.Dim.AUTO},), weights)
    with torch.no_grad():
        return encoder.regions(images)


def export_decoder(decoder: CaptionDecoder, features: Tensor, vocab_size: int, out: Path, weights: str,
                   memory: Tensor | None = None) -> dict[str, Any]:
    """Write the decoder's init and step graphs into `out`, traced on `features` (EXPORT_ROWS, L, C) and, for
    a retrieval decoder, their retrieved captions `memory` (EXPORT_ROWS, M), a second input of the init graph;
    return what model.json records of them. L stays as in `features`: it is the encoder's grid."""
    auto = torch.export.Dim.AUTO
    extra = (memory,) if memory is not None else ()
    with torch.no_grad():
        state = decoder.init_state(features, *extra)
        words = torch.randint(4, vocab_size, (len(features),), generator=torch.Generator().manual_seed(0))
        _, first, _ = decoder.step(words, state)
        _, second, _ = decoder.step(words, first)  # two steps in: no growing axis is left at a size of 0 or 1
    names = list(state)
    if set(first) != set(names):
        raise ValueError(f"{decoder.family}: step() returns state {sorted(first)}, init_state() {sorted(names)}; "
                         "the exported graphs need the same names")
    changed = [n for n in names if second[n] is not first[n]]
    varying = _varying_dims(first, second)
    _export(_Init(decoder, names), (features, *extra), out / GRAPHS["init"],
            ["features", *(["memory"] if extra else [])],
            [f"state.{n}" for n in names], ({0: auto},) * (1 + len(extra)), weights)
    state_shapes = [{d: auto for d in {0} | varying[n]} for n in names]
    # contiguous examples: the graphs take dense arrays, and a view's strides would enter the trace
    _export(_Step(decoder, names, changed), (words, [second[n].contiguous() for n in names]), out / GRAPHS["step"],
            ["words", *(f"state.{n}" for n in names)], ["logprobs", *(f"next.{n}" for n in changed), "alpha"],
            ({0: auto}, state_shapes), weights)
    return {"graphs": dict(GRAPHS), "state": names, "step_outputs": changed, "opset": _opset(out / GRAPHS["step"]),
            "torch": torch.__version__}


def _opset(path: Path) -> int:
    import onnx

    return next(o.version for o in onnx.load(str(path),
                                             load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))


def quantize_graphs(folder: Path, roles: Sequence[str]) -> None:
    """Store the weights of the graphs `roles` names as int8, in place, and list them in model.json
    (dynamic quantization: activations are quantized on the fly, so no calibration images are needed).
    The export quantizes the decoder only: with an int8 encoder the captions fall apart
    (scripts/bench/bench_onnx.py measures it)."""
    import onnx

    require_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    meta = read_model_json(folder)
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # the quantizer advises its shape pre-processing on every call
    try:
        for role in roles:
            path = folder / GRAPHS[role]
            model = onnx.load(str(path))
            # the exporter's intermediate shape annotations trip the quantizer's own shape inference (a
            # transposed weight keeps its old shape); they are optional, so they go
            del model.graph.value_info[:]
            plain, quantized = path.with_name(path.stem + ".plain.onnx"), path.with_name(path.stem + ".int8.onnx")
            onnx.save(model, str(plain))
            # one scale per output channel: closer to float32's captions than one per matrix, as fast
            quantize_dynamic(plain, quantized, weight_type=QuantType.QInt8, per_channel=True)
            plain.unlink()
            os.replace(quantized, path)
            _stamp(path, meta["onnx"]["weights_sha256"])
    finally:
        root.setLevel(level)
    meta["onnx"]["quantized"] = sorted(set(meta["onnx"]["quantized"]) | set(roles))
    write_model_json(folder, meta)


def quantize_decoder(folder: Path, reference: Captioner, images: list[Image.Image],
                     log: Callable[[str], None] = print) -> Agreement:
    """`--quantize int8`: the decoder's graphs in int8, compared with PyTorch float32 on `images`; the
    agreement is recorded in model.json, not required (docs/RESULTS.md has its cost on Flickr8k)."""
    quantize_graphs(folder, ["init", "step"])
    agreement = compare(reference, Captioner.from_pretrained(folder, backend="onnx"), images)
    log(f"int8: {agreement.same_captions} of {agreement.images} captions as float32 PyTorch's, "
        f"log-probabilities within {agreement.max_logprob_diff:.2f}")
    meta = read_model_json(folder)
    meta["onnx"]["check_int8"] = asdict(agreement)
    write_model_json(folder, meta)
    return agreement


@dataclass
class Agreement:
    """How an exported model's output compares with PyTorch's on the same images."""

    images: int
    same_captions: int  # images whose best caption is word for word the same
    max_logprob_diff: float  # largest |difference| of a next-word log-probability along PyTorch's captions
    max_score_diff: float  # largest |difference| of a best caption's total log-probability, where captions agree


def stepwise_logprobs(decoder: Any, features: Tensor, captions: list[list[int]], start: int, end: int) -> list[Tensor]:
    """Each caption's next-word log-probabilities (T+1, V), <end> included, fed its own words."""
    longest = max(len(c) for c in captions)
    words = torch.full((len(captions), longest + 1), end, dtype=torch.long)
    words[:, 0] = start
    for i, c in enumerate(captions):
        words[i, 1:len(c) + 1] = torch.tensor(c, dtype=torch.long)
    state, steps = decoder.init_state(features), []
    for t in range(longest + 1):
        logprobs, state, _ = decoder.step(words[:, t], state)
        steps.append(logprobs.float())
    stacked = torch.stack(steps, dim=1)
    return [stacked[i, :len(c) + 1] for i, c in enumerate(captions)]


@torch.inference_mode()
def compare(reference: Captioner, exported: Captioner, images: list[Image.Image]) -> Agreement:
    """Caption `images` with both (the reference's default decoding options, the decoder's own words:
    concepts act the same way on both, in PyTorch) and compare."""
    opts = replace(reference.options(), concepts=False, consensus=False)
    ours, theirs = [[r.captions for r in c.generate(images, opts)] for c in (reference, exported)]
    best = [c[0].tokens for c in ours]
    vocab = reference.vocab
    logprobs = []
    memory = retrieved(reference, images)
    for captioner in (reference, exported):
        batch = torch.stack([captioner.encoder.preprocess(im) for im in images])
        # memory: both are retrieval decoders, whose reading() gives the decoder for these photos
        decoder = cast(Any, captioner.decoder).reading(memory) if memory is not None else captioner.decoder
        logprobs.append(stepwise_logprobs(decoder, captioner.encoder.regions(batch), best, vocab.start, vocab.end))
    same = [a[0].tokens == b[0].tokens for a, b in zip(ours, theirs)]
    return Agreement(
        images=len(images), same_captions=sum(same),
        max_logprob_diff=max(float((a - b).abs().max()) for a, b in zip(*logprobs)),
        max_score_diff=max((abs(a[0].logprob - b[0].logprob) for a, b, s in zip(ours, theirs, same) if s), default=0.0))


def retrieved(reference: Captioner, images: list[Image.Image] | Tensor) -> Tensor | None:
    """A retrieval model's memory for images (or their features), as `caption` retrieves it at the model's
    defaults (Captioner.retrieved); None for other models."""
    if reference.datastore is None:
        return None
    with torch.no_grad():
        if not isinstance(images, Tensor):
            images = reference.encoder.regions(torch.stack([reference.encoder.preprocess(im) for im in images]))
        return reference.retrieved(images, reference.options())[0]


def verify(reference: Captioner, folder: Path, images: list[Image.Image],
           log: Callable[[str], None] = print) -> Agreement:
    """The export's self-check: onnxruntime on `folder` must give the reference's captions on `images`, and
    log-probabilities within TOLERANCE; a ValueError says how far off it is."""
    agreement = compare(reference, Captioner.from_pretrained(folder, backend="onnx"), images)
    log(f"check on {agreement.images} images: {agreement.same_captions} same captions, log-probabilities "
        f"within {agreement.max_logprob_diff:.1e} (tolerance {TOLERANCE:g})")
    if agreement.same_captions < agreement.images or agreement.max_logprob_diff > TOLERANCE:
        raise ValueError(f"the exported graphs disagree with PyTorch: {agreement.same_captions} of {agreement.images} "
                         f"captions the same, log-probabilities up to {agreement.max_logprob_diff:.3g} apart "
                         f"(tolerance {TOLERANCE:g})")
    return agreement


def check_images(n: int = 3, seed: int = 0) -> list[Image.Image]:
    """Smooth random colour fields of different shapes: any picture will do to compare two backends."""
    rng = np.random.default_rng(seed)
    sizes = [(320, 240), (240, 320), (300, 300), (400, 260)]
    return [Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
            .resize(sizes[i % len(sizes)], Image.Resampling.BICUBIC)
            for i in range(n)]


def export_onnx(model_dir: str | Path, out: str | Path, quantize: str = "none", images: list[Image.Image] | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export a model folder to the ONNX folder `out` (see the module docstring), checked against PyTorch on
    `images` (default: check_images()); return model.json's "onnx" section. The folder appears only
    when the check passes."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, not {quantize!r}")
    require_onnxruntime()
    require_exporter()
    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "model.safetensors").exists():
        raise FileNotFoundError(f"{model_dir} has no model.safetensors to export")
    images = images if images is not None else check_images()
    weights = weights_sha256(model_dir / "model.safetensors")
    reference = Captioner.from_pretrained(model_dir, device="cpu")
    encoder, decoder = reference.encoder, reference.decoder
    assert isinstance(encoder, Encoder) and isinstance(decoder, CaptionDecoder)  # the PyTorch backend's
    image_transforms(encoder.spec(), encoder.fit)  # refuses an encoder whose preprocessing needs its network
    meta = {k: v for k, v in read_model_json(model_dir).items() if k != "config"}
    def write(tmp: Path) -> None:  # the folder appears only whole and checked, as any model folder (atomic.py)
        log(f"exporting {GRAPHS['encoder']}")
        features = export_encoder(encoder, tmp, weights)
        log(f"exporting {GRAPHS['init']} and {GRAPHS['step']}")
        info = {"weights_sha256": weights, "exported_from": model_dir.name, "quantized": [],
                **export_decoder(decoder, features, len(reference.vocab), tmp, weights,
                                 retrieved(reference, features))}
        reference.vocab.save(tmp / "vocab.json")
        for extra in BESIDE_WEIGHTS:  # photo vectors, the check, a retrieval model's captions
            if (model_dir / extra).is_dir():
                shutil.copytree(model_dir / extra, tmp / extra)
            elif (model_dir / extra).is_file():
                shutil.copy2(model_dir / extra, tmp / extra)
        head = encoder.imagenet_head()
        if head is not None:  # what concepts need: the classifier over the encoder graph's output
            from safetensors.torch import save

            # bytes written like every other file (save_file's own open left it 0600, the rest 0644)
            (tmp / CONCEPT_HEAD).write_bytes(save({"weight": head[0].contiguous(), "bias": head[1].contiguous()}))
            info["concept_head"] = CONCEPT_HEAD
        write_model_json(tmp, {**meta, "onnx": info})
        info["check"] = {**asdict(verify(reference, tmp, images, log)), "tolerance": TOLERANCE}
        write_model_json(tmp, {**meta, "onnx": info})
        if quantize == "int8":
            quantize_decoder(tmp, reference, images, log)

    replace_folder(out, write)
    return read_model_json(out)["onnx"]
