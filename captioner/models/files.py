"""The model folder: model.safetensors, model.json and vocab.json, written atomically, and optionally
retrieval.safetensors (an ImageEmbedder: photo vectors for `captioner search`; a folder without it loads
as before, with no vectors), for a retrieval decoder, datastore/ (the caption datastore it reads by
default), and familiarity.safetensors (which photos are unlike the training photos: familiarity.py).

model.json (format version 2) holds what inference needs and nothing about how training ran:

    {"format": "captioner", "version": 2,
     "decoder": {"family": "attention", "args": {...the family's Args...}},
     "encoder": {...Encoder.spec()...}, "fit": "crop", "fine_tuned_encoder": false,
     "vocab": {"size": 2556, "pad": 0, "start": 1, "end": 2, "unk": 3},
     "decoding": {"beam_size": 3, "max_length": 20, "length_penalty": 0.0, "block_trigrams": false}}

"fit" (crop or squash) is how a photo that is not square meets the encoder (encoders.fit_photo); a folder
written before it existed crops. Version 1 folders (captioner 0.1, which stored the whole training config)
still load.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..atomic import read_folder, replace_folder, whole_version
from ..config import FITS
from ..decoder_args import current_decoder
from ..decoding_options import MODEL_DEFAULTS, MODEL_KEYS
from ..familiarity import FAMILIARITY_FILE, Familiarity, familiarity_bytes, read_familiarity
from ..sentences import SENTENCE_MODEL
from ..vocab import Vocab
from .base import CaptionDecoder, decoder_class
from .embedder import ImageEmbedder

if TYPE_CHECKING:
    from ..config import Config
    from ..datastore import Datastore
    from ..encoders import Encoder

FORMAT, VERSION = "captioner", 2
TUNED = "fine-tuned"  # how a spec's weights begin when they are a fine-tuned encoder's (tuned_weights)
# optional: the ImageEmbedder (with adapt's library head, where fitted), float16, its sentence model in the metadata
RETRIEVAL_FILE = "retrieval.safetensors"
DATASTORE_DIR = "datastore"  # a retrieval decoder's default caption datastore (datastore.py), beside its weights
# what a folder may hold beside its weights, each changing its output: an export carries them, the version names them
BESIDE_WEIGHTS = (RETRIEVAL_FILE, FAMILIARITY_FILE, DATASTORE_DIR)


def build_decoder(family: str, args: dict[str, Any], vocab_size: int, feature_dim: int,
                  words: list[str] | None = None, source: str = "arguments",
                  classifier: tuple[Tensor, Tensor, Tensor] | None = None) -> CaptionDecoder:
    """A family's decoder from its stored arguments; unknown argument names are refused by name,
    missing ones take the family's defaults (a newer family may add arguments). `classifier`: the
    ImageNet head and each class's word id that an attention-concepts decoder starts with (a loaded one
    has them in its weights)."""
    cls = decoder_class(family)
    known = {f.name for f in fields(cls.Args)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"{source}: decoder {family!r} has no argument(s) {', '.join(unknown)}")
    extra = {"classifier": classifier} if classifier is not None else {}
    return cls(cls.Args(**args), vocab_size, feature_dim, words=words, **extra)


def decoder_from_config(cfg: Config, vocab_size: int, feature_dim: int, words: list[str] | None = None,
                        classifier: tuple[Tensor, Tensor, Tensor] | None = None) -> CaptionDecoder:
    """The decoder `cfg.decoder` names, its arguments read from the config fields of the same names."""
    cls = decoder_class(cfg.decoder)
    return build_decoder(cfg.decoder, {f.name: getattr(cfg, f.name) for f in fields(cls.Args)}, vocab_size,
                         feature_dim, words, classifier=classifier)


def decoding_defaults(cfg: Config) -> dict[str, Any]:
    return {key: getattr(cfg, key) for key in MODEL_KEYS}


@dataclass
class LoadedModel:
    """A model folder read back: the decoder (eval mode) and what it needs around it."""

    decoder: CaptionDecoder
    vocab: Vocab
    encoder_spec: dict[str, Any]  # Encoder.spec() of the encoder the decoder was trained on
    encoder_state: dict[str, Tensor] | None  # the encoder's weights when it was fine-tuned, else None
    decoding: dict[str, Any]  # default decoding options
    path: Path
    embedder: ImageEmbedder | None = None  # photo vectors in the sentence encoder's space, when the folder has them
    fit: str = "crop"  # how a photo that is not square meets the encoder (config.FITS); older folders: crop
    familiarity: Familiarity | None = None  # which photos are unlike the training photos, when the folder says

    @property
    def features_spec(self) -> dict[str, Any]:
        """The spec of the features this model's encoder gives: its training spec, with the weights named
        by their digest when the encoder was fine-tuned. Cached features fit the model iff they have it."""
        if self.encoder_state is None:
            return self.encoder_spec
        return {**self.encoder_spec, "weights": tuned_weights(self.encoder_state)}

    def imagenet_head(self) -> tuple[Tensor, Tensor] | None:
        """The ImageNet classifier over this model's features (concepts.py): its fine-tuned encoder's, or
        the pretrained one's, read without building the encoder."""
        from ..encoders import pretrained_head

        if self.encoder_state is not None and "_fc.weight" in self.encoder_state:
            return self.encoder_state["_fc.weight"], self.encoder_state["_fc.bias"]
        return pretrained_head(self.encoder_spec)

    def encoder(self, device: str | torch.device = "cpu") -> Encoder:
        """Rebuild the encoder the model was trained on (pretrained, or its fine-tuned weights) and
        refuse it if it would not give the features the decoder learned from."""
        from ..encoders import create_encoder

        spec = self.encoder_spec
        encoder = create_encoder(spec["encoder"], pretrained=self.encoder_state is None,
                                 image_size=spec["image_size"], layer=spec["layer"])
        if self.encoder_state is not None:
            encoder.load_state_dict(self.encoder_state)
            encoder.weights = tuned_weights(self.encoder_state)
        check_encoder_spec(spec, encoder.spec(), str(self.path), weights=self.encoder_state is None)
        encoder.fit = self.fit
        return encoder.to(device).eval()


def check_encoder_spec(saved: dict[str, Any], actual: dict[str, Any], model: str, weights: bool = True) -> None:
    """Name every setting in which `actual` differs from what the model was trained on. The weights'
    origin counts unless they come from the model itself (a fine-tuned encoder)."""
    keys = [k for k in saved if weights or k != "weights"]
    diff = [f"{k} {saved[k]!r} (model) != {actual.get(k)!r}" for k in keys if saved[k] != actual.get(k)]
    if diff:
        raise ValueError(f"{model} was trained on other encoder features: {'; '.join(diff)}")


def tuned_weights(state: dict[str, Tensor]) -> str:
    """How a fine-tuned encoder's spec names its weights: a digest of the tensors (as float32), so
    features extracted with it are tied to exactly these weights."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().float().cpu().contiguous().numpy().tobytes())
    return f"{TUNED} (sha256 {digest.hexdigest()[:16]})"


def weights_sha256(path: Path) -> str:
    """The hex sha256 of a weights file: what a model's version and an export's origin are named by."""
    digest = hashlib.sha256()  # not hashlib.file_digest: that is Python 3.11+, and 3.10 is supported
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def tied_keys(module: torch.nn.Module) -> set[str]:
    """State-dict keys naming a tensor that an earlier key already names (tied weights): stored once."""
    seen: set[int] = set()
    tied = set()
    for key, value in module.state_dict(keep_vars=True).items():
        if id(value) in seen:
            tied.add(key)
        seen.add(id(value))
    return tied


def save_model(path: str | Path, decoder: CaptionDecoder, vocab: Vocab, encoder_spec: dict[str, Any],
               decoding: dict[str, Any], encoder_state: dict[str, Tensor] | None = None,
               dtype: torch.dtype = torch.float32, fit: str = "crop", familiarity: Familiarity | None = None) -> None:
    """Write a model folder through atomic.replace_folder: a reader (or a crash) never sees half a model;
    with `familiarity`, its familiarity check (FAMILIARITY_FILE) too.
    The weights are serialised in memory, then written: safetensors writing to a full disk raises its own
    error type, a plain write raises OSError(ENOSPC)."""
    from safetensors.torch import save

    tied = tied_keys(decoder)
    tensors = {f"decoder.{k}": v for k, v in decoder.state_dict().items() if k not in tied}
    if encoder_state is not None:
        tensors.update({f"encoder.{k}": v for k, v in encoder_state.items()})
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "version": VERSION,
            "decoder": {"family": decoder.family, "args": decoder.arguments()},
            "encoder": encoder_spec, "fit": fit, "fine_tuned_encoder": encoder_state is not None,
            "vocab": {"size": len(vocab), "pad": vocab.pad, "start": vocab.start, "end": vocab.end, "unk": vocab.unk},
            "decoding": {key: {**MODEL_DEFAULTS, **decoding}[key] for key in MODEL_KEYS}}

    def write(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(save(tensors))
        write_model_json(folder, meta)
        vocab.save(folder / "vocab.json")
        if familiarity is not None:
            (folder / FAMILIARITY_FILE).write_bytes(familiarity_bytes(familiarity))

    replace_folder(path, write)


def write_model_json(folder: Path, meta: dict[str, Any]) -> None:
    """model.json into a folder being written (replace_folder makes the whole folder appear at once)."""
    (folder / "model.json").write_text(json.dumps(meta, indent=1) + "\n")


def read_model_json(path: Path) -> dict[str, Any]:
    """model.json as version 2 with today's argument names, whatever version wrote it; a newer or foreign
    file is refused."""
    meta_path = path / "model.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{path} is not a captioner model folder (no model.json)")
    meta = json.loads(meta_path.read_text())
    version = meta.get("version")
    if meta.get("format") != FORMAT or not isinstance(version, int):
        raise ValueError(f"{meta_path}: not a captioner model file "
                         f"(format {meta.get('format')!r}, version {version!r})")
    if version > VERSION:
        raise ValueError(f"{meta_path}: model format version {version} is newer than this captioner reads "
                         f"({VERSION}); upgrade captioner")
    if version == 1:  # the whole training config: keep the family's arguments and the decoding options
        config = meta["config"]
        family, args = current_decoder(config["decoder"], config)
        names = [f.name for f in fields(decoder_class(family).Args)]
        meta = {**meta, "version": 2, "decoder": {"family": family, "args": {k: args[k] for k in names if k in args}},
                "decoding": {k: config[k] for k in MODEL_KEYS if k in config}}
    family, args = current_decoder(meta["decoder"]["family"], meta["decoder"]["args"])
    meta = {**meta, "decoder": {**meta["decoder"], "family": family, "args": args}, "fit": meta.get("fit", "crop")}
    if meta["fit"] not in FITS:
        raise ValueError(f"{meta_path}: fit must be one of {', '.join(FITS)}, got {meta['fit']!r}")
    return {**meta, "decoding": {**MODEL_DEFAULTS, **meta["decoding"]}}  # options newer than the file: defaults


def add_retrieval(path: str | Path, embedder: ImageEmbedder, sentence_model: str = SENTENCE_MODEL,
                  datastore: str | Path | None = None, output: str | Path | None = None) -> None:
    """Put (or replace) the retrieval file in an existing model folder, in float16 (1.7 MB for Lite0's
    features into MiniLM; its recall is float32's within 0.1, docs/RESULTS.md), and with `datastore` a copy
    of that caption datastore (a retrieval decoder's default, DATASTORE_DIR). The folder is rewritten whole
    through replace_folder, so a reader sees it with or without them, never half; with `output`, the result
    goes there and `path` stays as it was."""
    data = retrieval_bytes(embedder, sentence_model)

    def write(folder: Path) -> None:
        (folder / RETRIEVAL_FILE).write_bytes(data)
        if datastore is not None:
            shutil.copytree(whole_version(datastore), folder / DATASTORE_DIR)

    _rewrite(path, {RETRIEVAL_FILE} | ({DATASTORE_DIR} if datastore is not None else set()), write, output)


def add_familiarity(path: str | Path, familiarity: Familiarity) -> None:
    """Put (or replace) the familiarity check (FAMILIARITY_FILE) in an existing model folder, whole as add_retrieval."""
    data = familiarity_bytes(familiarity)
    _rewrite(path, {FAMILIARITY_FILE}, lambda folder: (folder / FAMILIARITY_FILE).write_bytes(data))


def _rewrite(path: str | Path, replaced: set[str], write: Callable[[Path], object],
             output: str | Path | None = None) -> None:
    """A model folder rewritten whole through replace_folder (into `output`, default: itself): every entry but
    those `replaced` copied, then write(folder) adds theirs."""
    source = whole_version(path)
    read_model_json(source)  # a model folder, of a version this captioner reads

    def rewrite(folder: Path) -> None:
        for file in source.iterdir():
            if file.name in replaced:
                continue
            if file.is_dir():
                shutil.copytree(file, folder / file.name)
            else:
                shutil.copy2(file, folder / file.name)
        write(folder)

    replace_folder(output if output is not None else path, rewrite)


def retrieval_bytes(embedder: ImageEmbedder, sentence_model: str = SENTENCE_MODEL) -> bytes:
    """RETRIEVAL_FILE's contents: the embedder in float16, its sentence model in the metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in embedder.state_dict().items()}
    return save(tensors, metadata={"sentence_model": sentence_model})


def model_datastore(folder: str | Path, embedder: ImageEmbedder | None,
                    override: str | Path | None = None) -> Datastore:
    """The caption datastore a retrieval model (PyTorch or ONNX folder) reads: `override`, or the one in its
    folder. A missing one, or one of another sentence encoder or width than the model's image vectors, is
    refused by name."""
    from ..datastore import DatastoreError, load_datastore

    if embedder is None:
        raise DatastoreError(f"{folder}: a retrieval model without an image embedder ({RETRIEVAL_FILE})")
    path = Path(override) if override is not None else whole_version(folder) / DATASTORE_DIR
    datastore = load_datastore(path)
    datastore.check_query(embedder.head.proj.out_features)
    return datastore


def read_retrieval(folder: Path) -> ImageEmbedder | None:
    """The folder's ImageEmbedder (float32, eval mode), or None when it ships none; one made for another
    sentence encoder is refused (its vectors would not be comparable with the queries')."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = folder / RETRIEVAL_FILE
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        model = (f.metadata() or {}).get("sentence_model")
    if model != SENTENCE_MODEL:
        raise ValueError(f"{path}: image vectors for sentence encoder {model!r}, "
                         f"not this captioner's {SENTENCE_MODEL!r}")
    tensors = {k: v.float() for k, v in load_file(str(path)).items()}
    embed_dim, region_dim = tensors["head.proj.weight"].shape
    embedder = ImageEmbedder(tensors["image_side.0.weight"].shape[1], region_dim, embed_dim,
                             library="library.proj.weight" in tensors)  # adapt's head, where fitted
    embedder.load_state_dict(tensors)
    return embedder.eval()


def average_models(models: list[LoadedModel]) -> LoadedModel:
    """The first model with every weight replaced by the mean over all of them: a uniform "model soup".
    It only makes sense for runs that share a start (seeds of self-critical training from one
    cross-entropy model), whose weights stay close enough for their mean to be a model too; the
    family, architecture, vocabulary and encoder must agree, and are refused by name if not."""
    first = models[0]
    for other in models[1:]:
        for what, a, b in (("decoder", _architecture(first), _architecture(other)), ("vocabulary", first.vocab.itos,
                           other.vocab.itos), ("encoder", first.encoder_spec, other.encoder_spec),
                           ("fine-tuned encoder", first.encoder_state is None, other.encoder_state is None)):
            if a != b:
                raise ValueError(f"cannot average {first.path} and {other.path}: their {what} differs")
    first.decoder.load_state_dict(_mean_state([m.decoder.state_dict() for m in models]))
    if first.encoder_state is not None:  # then every model has one: checked above
        first.encoder_state = _mean_state([m.encoder_state for m in models if m.encoder_state is not None])
    return first


def _mean_state(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Element-wise mean of floating tensors (in float32); integer ones, such as BatchNorm's batch
    count, are the first state's."""
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}


def _architecture(model: LoadedModel) -> tuple[str, dict[str, Any]]:
    return model.decoder.family, vars(model.decoder.args)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """A model folder on any device, whatever device the model was trained on. Read through
    atomic.read_folder: one whole version even while training swaps in a new best model."""
    return read_folder(path, lambda folder: _read_model(folder, Path(path), device))


def _read_model(folder: Path, path: Path, device: str | torch.device) -> LoadedModel:
    from safetensors.torch import load_file

    meta = read_model_json(folder)
    if "onnx" in meta and not (folder / "model.safetensors").exists():
        raise ValueError(f"{path} is an ONNX export without PyTorch weights: "
                         "load it with backend='onnx' (--backend onnx)")
    vocab = Vocab.load(folder / "vocab.json")
    tensors = load_file(str(folder / "model.safetensors"), device="cpu")
    decoder = build_decoder(meta["decoder"]["family"], meta["decoder"]["args"], len(vocab), meta["encoder"]["channels"],
                            source=str(folder / "model.json"))
    weights = {k.removeprefix("decoder."): v.float() for k, v in tensors.items() if k.startswith("decoder.")}
    missing, unexpected = decoder.load_state_dict(weights, strict=False)
    if set(missing) != tied_keys(decoder) or unexpected:
        raise ValueError(f"{folder / 'model.safetensors'} does not fit its model.json: missing "
                         f"{sorted(set(missing) - tied_keys(decoder))}, unexpected {sorted(unexpected)}")
    encoder_state = {k.removeprefix("encoder."): v.float() if v.is_floating_point() else v
                     for k, v in tensors.items() if k.startswith("encoder.")} or None
    embedder = read_retrieval(folder)
    return LoadedModel(decoder.to(device).eval(), vocab, meta["encoder"], encoder_state, meta["decoding"], path,
                       embedder.to(device) if embedder is not None else None, meta["fit"],
                       read_familiarity(folder, meta["encoder"]["channels"]))
