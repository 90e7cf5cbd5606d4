"""The ONNX backend: a model folder exported to onnxruntime graphs, run under the same beam search.

`captioner export --format onnx MODEL OUT` writes three graphs, each with a dynamic batch axis, next to
vocab.json and model.json, so that OUT is a model folder of its own:

    encoder.onnx        images (B, 3, S, S)           -> features (B, L, C)
    decoder_init.onnx   features (B, L, C)            -> state.NAME, ... (the decoder's State)
    decoder_step.onnx   words (B,), state.NAME, ...   -> logprobs (B, V), next.NAME, ..., alpha (B, L)

The decoder's state dict becomes one graph input or output per tensor, in the order model.json's
`onnx.state` lists. The step graph outputs only the tensors a step changes (`onnx.step_outputs`);
`OnnxDecoder.step` hands back the very tensor objects it was given for the others (the attention
decoder's projected features and keys), which is what lets beam search leave them in place
(decoding.py). Tensors cross between torch and numpy only at the sessions' edges, without copies on
the way in or out, so `beam_search` serves both backends.

The graphs come from torch.onnx's dynamo exporter (torch.export, then onnxscript): the default and
maintained one in torch 2.13, and it fails loudly where a shape would be baked in, where the older
TorchScript exporter (which warns it will be removed) traces shape arithmetic into constants. Axes
of the state that grow from step to step (a key/value cache's length) are found by stepping twice
and comparing shapes, and stay dynamic like the batch.

Each graph carries in its metadata the sha256 of the model.safetensors it was exported from, and
model.json records it as `onnx.weights_sha256`: loading refuses a folder whose graphs came from other
weights (a graph copied in from another export), naming the graph.

The export checks itself before the folder appears: the same images through PyTorch and onnxruntime
must give the same captions, and log-probabilities within TOLERANCE along them. `quantize="int8"`
then stores the decoder's weights as int8 (onnxruntime's dynamic quantization); its cost in agreement
is measured and recorded, not required (docs/RESULTS.md has it on Flickr8k).
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .atomic import replace_folder
from .encoders import image_transforms
from .models.base import CaptionDecoder, State
from .models.files import read_model_json, weights_sha256
from .vocab import Vocab

if TYPE_CHECKING:
    import onnxruntime

    from .pipeline import Captioner

GRAPHS = {"encoder": "encoder.onnx", "init": "decoder_init.onnx", "step": "decoder_step.onnx"}
QUANTIZE = ("none", "int8")
# Largest difference allowed between a PyTorch and an onnxruntime float32 log-probability: the two
# libraries sum in different orders, which moves float32 results by about 1e-5 here.
TOLERANCE = 1e-3
WEIGHTS_KEY = "captioner.weights_sha256"
EXPORT_ROWS = 5  # batch of the example inputs; any size other than 1 keeps the batch axis dynamic


def require_onnxruntime() -> Any:
    """onnxruntime, or an ImportError that says how to get it (it is an optional dependency)."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError("the onnx backend needs onnxruntime: pip install 'captioner[onnx]'") from err
    return onnxruntime


def require_exporter() -> None:
    """The exporter's dependencies: onnx, and onnxscript, which torch.onnx's dynamo exporter builds graphs with."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(f"exporting to ONNX needs onnx and onnxscript ({err.name} is missing): "
                          "pip install 'captioner[onnx]'") from err


# ---------------------------------------------------------------------------------------------------------
# running the graphs

def open_session(path: Path, threads: int | None) -> onnxruntime.InferenceSession:
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    # as many threads as torch uses, so the two backends are compared on the same footing
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: shape-inference notes are not the user's business
    # idle threads sleep instead of spinning: beam search runs torch ops between the steps on the same
    # cores, and threads spinning for the next run took the cores from them
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """encoder.onnx behind the surface the pipeline uses of an Encoder: preprocess, crop, regions, grid."""

    def __init__(self, session: onnxruntime.InferenceSession, spec: dict[str, Any]) -> None:
        self.session, self._spec = session, spec
        self.name, self.image_size, self.channels = spec["encoder"], spec["image_size"], spec["channels"]
        self.crop, self.preprocess = image_transforms(spec)

    def regions(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, L, C)."""
        return torch.from_numpy(self.session.run(None, {"images": images.contiguous().numpy()})[0])

    def grid(self) -> tuple[int, int]:
        return tuple(self._spec["grid"])

    def spec(self) -> dict[str, Any]:
        return dict(self._spec)


class OnnxDecoder:
    """decoder_init.onnx and decoder_step.onnx as a decoding.Decoder: init_state and step on torch tensors."""

    def __init__(self, init: onnxruntime.InferenceSession, step: onnxruntime.InferenceSession,
                 state: Sequence[str], step_outputs: Sequence[str]) -> None:
        self.init, self.step_session = init, step
        self.state_names, self.step_outputs = list(state), list(step_outputs)
        self._outputs = ["logprobs", *(f"next.{n}" for n in self.step_outputs), "alpha"]

    def init_state(self, features: Tensor) -> State:
        outputs = self.init.run([f"state.{n}" for n in self.state_names], {"features": features.contiguous().numpy()})
        return {name: torch.from_numpy(x) for name, x in zip(self.state_names, outputs)}

    def step(self, words: Tensor, state: State) -> tuple[Tensor, State, Tensor]:
        feed = {"words": words.contiguous().numpy(), **{f"state.{n}": state[n].contiguous().numpy() for n in self.state_names}}
        logprobs, *changed, alpha = self.step_session.run(self._outputs, feed)
        new_state = dict(state)  # what the step does not change stays the same object
        new_state.update((name, torch.from_numpy(x)) for name, x in zip(self.step_outputs, changed))
        return torch.from_numpy(logprobs), new_state, torch.from_numpy(alpha)


@dataclass
class OnnxModel:
    """An exported model folder read back, the counterpart of models.LoadedModel."""

    encoder: OnnxEncoder
    decoder: OnnxDecoder
    vocab: Vocab
    decoding: dict[str, Any]
    meta: dict[str, Any]  # model.json's "onnx" section
    path: Path


def load_onnx(path: str | Path, threads: int | None = None) -> OnnxModel:
    """An exported folder's graphs as onnxruntime sessions (CPU); graphs from other weights are refused."""
    path = Path(path)
    meta = read_model_json(path)
    if "onnx" not in meta:
        raise ValueError(f"{path} holds no ONNX graphs; make them with `captioner export --format onnx {path} OUT`")
    info = meta["onnx"]
    sessions = {}
    for role, name in info["graphs"].items():
        if not (path / name).exists():
            raise FileNotFoundError(f"{path / name} is missing (listed in {path / 'model.json'})")
        sessions[role] = open_session(path / name, threads)
        origin = sessions[role].get_modelmeta().custom_metadata_map.get(WEIGHTS_KEY, "unknown weights")
        if origin != info["weights_sha256"]:
            raise ValueError(f"{path / name} was exported from other weights (sha256 {origin[:12]}) than "
                             f"{path / 'model.json'} records ({info['weights_sha256'][:12]}); export the folder again")
    encoder = OnnxEncoder(sessions["encoder"], meta["encoder"])
    decoder = OnnxDecoder(sessions["init"], sessions["step"], info["state"], info["step_outputs"])
    return OnnxModel(encoder, decoder, Vocab.load(path / "vocab.json"), meta["decoding"], info, path)


# ---------------------------------------------------------------------------------------------------------
# exporting

class _Regions(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder.regions(images)


class _Init(nn.Module):
    def __init__(self, decoder: CaptionDecoder, names: list[str]) -> None:
        super().__init__()
        self.decoder, self.names = decoder, names

    def forward(self, features: Tensor) -> tuple[Tensor, ...]:
        state = self.decoder.init_state(features)
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


def export_encoder(encoder: nn.Module, out: Path, weights: str) -> Tensor:
    """Write encoder.onnx into `out`; return the features of the example images, for export_decoder."""
    images = torch.rand(EXPORT_ROWS, 3, encoder.image_size, encoder.image_size,
                        generator=torch.Generator().manual_seed(0)) * 2 - 1
    _export(_Regions(encoder), (images,), out / GRAPHS["encoder"], ["images"], ["features"],
            ({0: torch.export.Dim.AUTO},), weights)
    with torch.no_grad():
        return encoder.regions(images)


def export_decoder(decoder: CaptionDecoder, features: Tensor, vocab_size: int, out: Path, weights: str) -> dict[str, Any]:
    """Write the decoder's init and step graphs into `out`, traced on `features` (EXPORT_ROWS, L, C);
    return what model.json records of them. L stays as in `features`: it is the encoder's grid."""
    auto = torch.export.Dim.AUTO
    with torch.no_grad():
        state = decoder.init_state(features)
        words = torch.randint(4, vocab_size, (len(features),), generator=torch.Generator().manual_seed(0))
        _, first, _ = decoder.step(words, state)
        _, second, _ = decoder.step(words, first)  # two steps in: no growing axis is left at a size of 0 or 1
    names = list(state)
    if set(first) != set(names):
        raise ValueError(f"{decoder.family}: step() returns state {sorted(first)}, init_state() {sorted(names)}; "
                         "the exported graphs need the same names")
    changed = [n for n in names if second[n] is not first[n]]
    varying = _varying_dims(first, second)
    _export(_Init(decoder, names), (features,), out / GRAPHS["init"], ["features"], [f"state.{n}" for n in names],
            ({0: auto},), weights)
    state_shapes = [{d: auto for d in {0} | varying[n]} for n in names]
    # contiguous examples: the graphs take dense arrays, and a view's strides would enter the trace
    _export(_Step(decoder, names, changed), (words, [second[n].contiguous() for n in names]), out / GRAPHS["step"],
            ["words", *(f"state.{n}" for n in names)], ["logprobs", *(f"next.{n}" for n in changed), "alpha"],
            ({0: auto}, state_shapes), weights)
    return {"graphs": dict(GRAPHS), "state": names, "step_outputs": changed, "opset": _opset(out / GRAPHS["step"]),
            "torch": torch.__version__}


def _opset(path: Path) -> int:
    import onnx

    return next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))


def quantize_graphs(folder: Path, roles: Sequence[str]) -> None:
    """Store the weights of the graphs `roles` names as int8, in place, and list them in model.json
    (dynamic quantization: activations are quantized on the fly, so no calibration images are needed).
    The export quantizes the decoder only: with an int8 encoder the captions fall apart
    (scripts/bench_onnx.py measures it)."""
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
    _write_meta(folder, meta)


def quantize_decoder(folder: Path, reference: Captioner, images: list[Image.Image],
                     log: Callable[[str], None] = print) -> Agreement:
    """`--quantize int8`: the decoder's graphs in int8, compared with PyTorch float32 on `images`; the
    agreement is recorded in model.json, not required (docs/RESULTS.md has its cost on Flickr8k)."""
    from .pipeline import Captioner

    quantize_graphs(folder, ["init", "step"])
    agreement = compare(reference, Captioner.from_pretrained(folder, backend="onnx"), images)
    log(f"int8: {agreement.same_captions} of {agreement.images} captions as float32 PyTorch's, "
        f"log-probabilities within {agreement.max_logprob_diff:.2f}")
    meta = read_model_json(folder)
    meta["onnx"]["check_int8"] = asdict(agreement)
    _write_meta(folder, meta)
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
    """Caption `images` with both (the reference's default decoding options) and compare."""
    opts = reference.options()
    ours, theirs = reference.generate(images, opts), exported.generate(images, opts)
    best = [c[0].tokens for c in ours]
    vocab = reference.vocab
    logprobs = []
    for captioner in (reference, exported):
        batch = torch.stack([captioner.encoder.preprocess(im) for im in images])
        logprobs.append(stepwise_logprobs(captioner.decoder, captioner.encoder.regions(batch), best, vocab.start, vocab.end))
    same = [a[0].tokens == b[0].tokens for a, b in zip(ours, theirs)]
    return Agreement(
        images=len(images), same_captions=sum(same),
        max_logprob_diff=max(float((a - b).abs().max()) for a, b in zip(*logprobs)),
        max_score_diff=max((abs(a[0].logprob - b[0].logprob) for a, b, s in zip(ours, theirs, same) if s), default=0.0))


def verify(reference: Captioner, folder: Path, images: list[Image.Image], log: Callable[[str], None] = print) -> Agreement:
    """The export's self-check: onnxruntime on `folder` must give the reference's captions on `images`, and
    log-probabilities within TOLERANCE; a ValueError says how far off it is."""
    from .pipeline import Captioner

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
    return [Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(sizes[i % len(sizes)], Image.BICUBIC)
            for i in range(n)]


def export_onnx(model_dir: str | Path, out: str | Path, quantize: str = "none", images: list[Image.Image] | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export a model folder to the ONNX folder `out` (see the module docstring), checked against PyTorch on
    `images` (default: check_images()); return model.json's "onnx" section. The folder appears only
    when the check passes."""
    from .pipeline import Captioner

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
    image_transforms(reference.encoder.spec())  # refuses an encoder whose preprocessing needs its network
    meta = {k: v for k, v in read_model_json(model_dir).items() if k != "config"}
    def write(tmp: Path) -> None:  # the folder appears only whole and checked, as any model folder (atomic.py)
        log(f"exporting {GRAPHS['encoder']}")
        features = export_encoder(reference.encoder, tmp, weights)
        log(f"exporting {GRAPHS['init']} and {GRAPHS['step']}")
        info = {"weights_sha256": weights, "exported_from": model_dir.name, "quantized": [],
                **export_decoder(reference.decoder, features, len(reference.vocab), tmp, weights)}
        reference.vocab.save(tmp / "vocab.json")
        _write_meta(tmp, {**meta, "onnx": info})
        info["check"] = {**asdict(verify(reference, tmp, images, log)), "tolerance": TOLERANCE}
        _write_meta(tmp, {**meta, "onnx": info})
        if quantize == "int8":
            quantize_decoder(tmp, reference, images, log)

    replace_folder(out, write)
    return read_model_json(out)["onnx"]


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    (folder / "model.json").write_text(json.dumps(meta, indent=1) + "\n")
