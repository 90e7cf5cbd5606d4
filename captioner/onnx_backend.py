"""The ONNX backend: running a model folder exported to onnxruntime graphs under the same beam search.

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

Each graph carries in its metadata the sha256 of the model.safetensors it was exported from, and
model.json records it as `onnx.weights_sha256`: loading refuses a folder whose graphs came from other
weights (a graph copied in from another export), naming the graph. onnx_export.py writes the folder.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from .encoders import image_transforms
from .extras import install_hint
from .familiarity import Familiarity, read_familiarity
from .models.base import State, decoder_class
from .models.embedder import ImageEmbedder
from .models.files import read_model_json, read_retrieval
from .models.retrieval import WithMemory
from .vocab import Vocab

if TYPE_CHECKING:
    import onnxruntime

GRAPHS = {"encoder": "encoder.onnx", "init": "decoder_init.onnx", "step": "decoder_step.onnx"}
CONCEPT_HEAD = "concept_head.safetensors"  # the encoder's ImageNet classifier, where it has one
WEIGHTS_KEY = "captioner.weights_sha256"


def require_onnxruntime() -> Any:
    """onnxruntime, or an ImportError that says how to get it (it is an optional dependency)."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(f"the onnx backend needs onnxruntime: {install_hint('onnx')}") from err
    return onnxruntime


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

    def __init__(self, session: onnxruntime.InferenceSession, spec: dict[str, Any], fit: str) -> None:
        self.session, self._spec = session, spec
        self.name, self.image_size, self.channels = spec["encoder"], spec["image_size"], spec["channels"]
        self.crop, self.preprocess = image_transforms(spec, fit)

    def regions(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, L, C)."""
        return torch.from_numpy(self.session.run(None, {"images": images.contiguous().numpy()})[0])

    def grid(self) -> tuple[int, int]:
        return tuple(self._spec["grid"])

    def spec(self) -> dict[str, Any]:
        return dict(self._spec)


class OnnxDecoder:
    """decoder_init.onnx and decoder_step.onnx as a models.base.Decoder: init_state and step on torch tensors."""

    def __init__(self, init: onnxruntime.InferenceSession, step: onnxruntime.InferenceSession,
                 state: Sequence[str], step_outputs: Sequence[str], args: Any = None) -> None:
        self.init, self.step_session = init, step
        self.state_names, self.step_outputs = list(state), list(step_outputs)
        self._outputs = ["logprobs", *(f"next.{n}" for n in self.step_outputs), "alpha"]
        # a retrieval decoder's init graph also takes the memory (models/retrieval.py): its arguments say how big
        self.reads_memory = "memory" in {i.name for i in init.get_inputs()}
        self.args = args

    def init_state(self, features: Tensor, memory: Tensor | None = None) -> State:
        feed = {"features": features.contiguous().numpy()}
        if self.reads_memory:
            if memory is None:  # nothing retrieved: the decoder reads only its learned slot
                memory = torch.zeros(len(features), self.args.neighbours * self.args.memory_length, dtype=torch.long)
            feed["memory"] = memory.contiguous().numpy()
        outputs = self.init.run([f"state.{n}" for n in self.state_names], feed)
        return {name: torch.from_numpy(x) for name, x in zip(self.state_names, outputs)}

    def reading(self, memory: Tensor) -> WithMemory:
        """This decoder for photos whose retrieved captions are `memory`, as the PyTorch one."""
        return WithMemory(cast(Any, self), memory)  # duck-types RetrievalLSTM: the same init_state and step

    def step(self, words: Tensor, state: State) -> tuple[Tensor, State, Tensor]:
        feed = {"words": words.contiguous().numpy(),
                **{f"state.{n}": state[n].contiguous().numpy() for n in self.state_names}}
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
    head: tuple[Tensor, Tensor] | None  # the encoder's ImageNet classifier, for concepts (weight, bias)
    embedder: ImageEmbedder | None = None  # photo vectors (retrieval.safetensors, run in PyTorch), where exported
    familiarity: Familiarity | None = None  # which photos are unlike the training photos, where exported


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
    encoder = OnnxEncoder(sessions["encoder"], meta["encoder"], meta["fit"])
    family = decoder_class(meta["decoder"]["family"])
    decoder = OnnxDecoder(sessions["init"], sessions["step"], info["state"], info["step_outputs"],
                          family.Args(**meta["decoder"]["args"]))
    head = None
    if "concept_head" in info:  # run in PyTorch: one small matrix product over the encoder's output
        from safetensors.torch import load_file

        tensors = load_file(str(path / info["concept_head"]))
        head = tensors["weight"], tensors["bias"]
    return OnnxModel(encoder, decoder, Vocab.load(path / "vocab.json"), meta["decoding"], info, path, head,
                     read_retrieval(path), read_familiarity(path, meta["encoder"]["channels"]))
