"""`Captioner`: one call from image to text, in the style of the Hugging Face image-to-text pipeline.

    >>> from captioner import Captioner
    >>> captioner = Captioner.from_pretrained()          # the model shipped in the package
    >>> captioner("photo.jpg")
    [{'generated_text': 'a dog runs through the grass', 'score': -4.1}]
    >>> captioner.embed(["photo.jpg"]).shape                # where the model ships retrieval.safetensors
    (1, 384)
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from PIL import Image

from .concepts import SHOWN, SHOWN_MOST, Concepts, concept_table, top_concepts
from .config import BACKENDS
from .data import ImageError, load_image
from .decoding import Caption, beam_search, chosen, search_options, voters_needed
from .decoding_options import OPTIONS, DecodingOptions
from .familiarity import Familiarity, unfamiliar_photos
from .models import CaptionDecoder, Decoder, decoder_class, load_model, model_datastore, weights_sha256
from .models.files import BESIDE_WEIGHTS, DATASTORE_DIR, read_model_json
from .models.retrieval import neighbours_read, retrieve
from .runtime import collector_spares_old_objects, resolve_device
from .vocab import Vocab

if TYPE_CHECKING:
    from .datastore import Datastore, Neighbours
    from .encoders import Encoder
    from .models.embedder import ImageEmbedder
    from .onnx_backend import OnnxEncoder

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "flickr8k-lite0"
# generate()'s names in Hugging Face transformers -> ours, where they mean the same thing
HF_NAMES = {"max_new_tokens": "max_length", "num_beams": "beam_size", "num_return_sequences": "num_captions"}
ImageInput = str | Path | bytes | Image.Image | np.ndarray | torch.Tensor
ACCEPTED = "a path (str or Path), the bytes of an image file, a PIL image, a numpy array or a torch tensor"


class Captioner:
    """Encoder, decoder and vocabulary of one trained model, with its default decoding options.

    The encoder and decoder are PyTorch modules in eval mode, or their onnxruntime stand-ins
    (onnx_backend.py) with the same methods: nothing past `from_pretrained` asks which. `concepts`
    (where the encoder has its ImageNet head) names what the encoder recognises and lets the captions
    say it (concepts.py); `words` is the vocabulary captions are written in, the model's own extended
    by the concept words it lacks. `embedder` (where the model folder ships one) gives each image a unit
    vector in the sentence encoder's space, for `captioner search`. `datastore` (for a retrieval decoder,
    models/retrieval.py) holds the human captions it reads: those nearest each photo's vector. `familiarity`
    (where the folder ships one) tells the photos unlike the model's training photos, whose captions the
    datastore's captions then vote on (familiarity.py)."""

    def __init__(self, encoder: Encoder | OnnxEncoder, decoder: Decoder, vocab: Vocab, defaults: DecodingOptions,
                 device: torch.device, path: Path | None = None, concepts: Concepts | None = None,
                 embedder: ImageEmbedder | None = None, datastore: Datastore | None = None,
                 familiarity: Familiarity | None = None) -> None:
        self.encoder, self.decoder, self.vocab = encoder, decoder, vocab
        self.defaults, self.device, self.path, self.concepts = defaults, device, path, concepts
        self.embedder, self.datastore, self.familiarity = embedder, datastore, familiarity
        self.words = concepts.vocab if concepts is not None else vocab
        self.name = path.name if path is not None else ""

    @classmethod
    @collector_spares_old_objects()
    def from_pretrained(cls, path: str | Path | None = None, device: str = "auto", backend: str = "torch",
                        datastore: str | Path | None = None) -> Captioner:
        """The shipped default model, or any model folder `captioner train` wrote (runs/NAME/best); with
        backend="onnx" (or on its own when the folder holds graphs and no PyTorch weights), a folder `captioner
        export --format onnx` wrote, run by onnxruntime on the CPU. `datastore`: the caption datastore a
        retrieval model reads instead of its own (`captioner datastore build`): a user's captions steer its
        words without training."""
        path = Path(path) if path is not None else DEFAULT_MODEL
        from .onnx_backend import GRAPHS

        if backend == "torch" and not (path / "model.safetensors").exists() and (path / GRAPHS["step"]).exists():
            backend = "onnx"  # an exported folder has only graphs: what else could run it
        if backend == "onnx":
            from .onnx_backend import load_onnx

            if device not in ("auto", "cpu"):
                raise ValueError(f"the onnx backend runs on the CPU, not {device!r}; "
                                 "use --backend torch for that device")
            exported = load_onnx(path)
            concepts = Concepts(*exported.head, exported.vocab) if exported.head is not None else None
            return cls(exported.encoder, exported.decoder, exported.vocab, DecodingOptions(**exported.decoding),
                       torch.device("cpu"), path=path, concepts=concepts, embedder=exported.embedder,
                       datastore=_datastore(path, exported.decoder, exported.embedder, datastore),
                       familiarity=exported.familiarity)
        if backend != "torch":
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        dev = resolve_device(device)
        model = load_model(path, dev)
        encoder = model.encoder(dev).for_inference()
        head = encoder.imagenet_head()
        concepts = Concepts(*head, model.vocab) if head is not None else None
        return cls(encoder, model.decoder, model.vocab, DecodingOptions(**model.decoding), dev, path=path,
                   concepts=concepts, embedder=model.embedder,
                   datastore=_datastore(path, model.decoder, model.embedder, datastore),
                   familiarity=model.familiarity)

    @functools.cached_property
    def version(self) -> str:
        """First 12 hex digits of a sha256 naming what writes the captions: the weights file's, and where the
        folder has them, its image vectors' and familiarity check's and the datastore read (its own or
        `--datastore`'s), since each changes captions. Any retrained or re-exported model, or any of those
        swapped, gets a new one, so a caption can be traced to what wrote it and a resumed bulk run never mixes
        two ("" for a model not from a folder); a folder of weights alone is named by the weights' sha256 as it
        always was. An ONNX folder is named by the weights it was exported from and the files it carries beside
        them, as its PyTorch folder, and "-int8" when quantized."""
        if self.path is None:
            return ""
        suffix = ""
        if (self.path / "model.safetensors").exists():
            digest = weights_sha256(self.path / "model.safetensors")
        else:
            onnx = read_model_json(self.path).get("onnx", {})
            digest, suffix = onnx.get("weights_sha256", ""), "-int8" if onnx.get("quantized") else ""
        beside = [self.path / name for name in BESIDE_WEIGHTS if name != DATASTORE_DIR]  # the datastore read instead
        if self.datastore is not None and self.datastore.path is not None:
            beside += sorted(p for p in Path(self.datastore.path).iterdir() if p.is_file())
        extra = [weights_sha256(p) for p in beside if p.is_file()]
        if extra:
            digest = hashlib.sha256(" ".join([digest, *extra]).encode()).hexdigest()
        return digest[:12] + suffix

    @functools.cached_property
    def title(self) -> str:
        """What the page and the API description call the model: its decoder family's title."""
        # no folder: a PyTorch decoder built in memory, whose class is registered under its family
        family = (read_model_json(self.path)["decoder"]["family"] if self.path is not None
                  else cast(CaptionDecoder, self.decoder).family)
        return decoder_class(family).title

    def options(self, **overrides: Any) -> DecodingOptions:
        """The model's defaults with `overrides` on top (None: the default). The names Hugging Face's
        generate() uses map where they mean the same (max_new_tokens, num_beams, num_return_sequences); any
        other unknown name is a ValueError listing the options."""
        overrides = {HF_NAMES.get(k, k): v for k, v in overrides.items()}
        unknown = sorted(set(overrides) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown decoding option(s) {', '.join(unknown)}; the options are "
                             f"{', '.join(OPTIONS)}")
        values = {k: v for k, v in overrides.items() if v is not None}
        base = vars(self.defaults) | values
        if "num_captions" not in values:
            base["num_captions"] = 1
        return DecodingOptions(**base)

    @torch.inference_mode()
    def generate(self, images: list[Image.Image] | torch.Tensor, opts: DecodingOptions,
                 vectors: bool = False) -> list[CaptionResult]:
        """Captions, concepts and (with `vectors` and an embedder: bulk captioning's lines) vectors for loaded
        RGB images, or for a (B, 3, S, S) batch `encoder.preprocess` made, as one batch."""
        if not isinstance(images, torch.Tensor):
            images = torch.stack([self.encoder.preprocess(im) for im in images])
        batch = images.to(self.device)
        features = self.encoder.regions(batch)
        shown: list[list[tuple[str, float]]] = [[] for _ in range(len(batch))]
        similar: list[list[tuple[str, float]]] = [[] for _ in range(len(batch))]
        retrieving = self.datastore is not None and opts.retrieval
        # photos unlike the training photos: retrieval takes their vectors from adapt's library head (where the
        # embedder has one) and, among the captions retrieved, they are voted on (decoding.chosen)
        unfamiliar = unfamiliar_photos(self.familiarity, features, opts.unfamiliar_threshold)
        embedded = (self.embedder(features, unfamiliar).cpu().numpy()
                    if (vectors or retrieving) and self.embedder is not None else None)
        # the ImageNet head's concepts once per batch: tags, retrieval's ranking and the concept check read them
        probs = self.concepts.probs(features).cpu().numpy() if self.concepts is not None else None
        decoder, found = self.search_decoder(features, opts, embedded, probs)
        if found is not None:
            read = neighbours_read(cast(Any, self.decoder).args, opts.retrieved)
            similar = [list(zip(texts[:read], sims[:read].tolist()))
                       for texts, sims in zip(found.texts, found.similarity)]
        if probs is not None:
            shown = top_concepts(torch.from_numpy(probs), threshold=SHOWN, k=SHOWN_MOST)
        results = beam_search(decoder, features,
                              search_options(opts, voting=found is not None and bool(unfamiliar.any())))
        if found is not None:
            assert self.datastore is not None
            rows = probs if probs is not None else [None] * len(batch)
            results = [chosen(captions, self.words, voters, self.datastore, p, opts, u)
                       for captions, voters, p, u in zip(results, found.texts, rows, unfamiliar)]
        kept = embedded if vectors and embedded is not None else [None] * len(batch)
        return [CaptionResult(captions, concepts, vector, neighbours) for captions, concepts, vector, neighbours
                in zip(results, shown, kept, similar)]

    def search_decoder(self, features: torch.Tensor, opts: DecodingOptions, embedded: np.ndarray | None = None,
                       probs: np.ndarray | None = None) -> tuple[Decoder, Neighbours | None]:
        """What beam search steps for images' features under `opts`: the decoder reading the captions retrieved
        for them (a retrieval model, retrieval on), their concept words lifted (concepts on); and those
        neighbours (None without retrieval). `embedded`, `probs`: as `retrieved` takes them."""
        decoder: Decoder = self.decoder
        found = None
        if self.datastore is not None and opts.retrieval:
            memory, found = self.retrieved(features, opts, embedded, probs)
            decoder = cast(Any, self.decoder).reading(memory.to(self.device))  # a retrieval decoder
        if self.concepts is not None and opts.concepts:
            decoder = self.concepts.decoder(decoder, opts.concept_threshold)
        return decoder, found

    def retrieved(self, features: torch.Tensor, opts: DecodingOptions, embedded: np.ndarray | None = None,
                  probs: np.ndarray | None = None) -> tuple[torch.Tensor, Neighbours]:
        """A retrieval model's memory for images' features, and the neighbours in it: their captions nearest
        their vectors (`embedded`, when already computed), ranked again by the concept words they name (their
        concept probabilities `probs`, when already computed)."""
        assert self.datastore is not None and self.embedder is not None  # a model with a datastore has an embedder
        if embedded is None:
            unfamiliar = unfamiliar_photos(self.familiarity, features, opts.unfamiliar_threshold)
            embedded = self.embedder(features, unfamiliar).cpu().numpy()
        if probs is None and self.concepts is not None:
            probs = self.concepts.probs(features).cpu().numpy()
        return retrieve(self.datastore, embedded, self.vocab, cast(Any, self.decoder).args, opts.retrieved,
                        concept_probs=probs, concept_words=concept_table().vocabulary,
                        concept_weight=opts.retrieval_concepts,
                        voters=voters_needed(opts, familiarity_check=self.familiarity is not None))

    @torch.inference_mode()
    def embed(self, inputs: list[ImageInput], batch_size: int = 16) -> np.ndarray:
        """(n, D) float32 unit vectors of images (as `__call__` takes them) in the sentence encoder's space,
        without captioning them: what `captioner search` compares a query with besides the captions. Needs a
        model folder with retrieval.safetensors (`captioner add-retrieval-head` puts one there)."""
        if self.embedder is None:
            raise ValueError(f"{self.path or 'this model'} has no image embedder (no retrieval.safetensors)")
        items, _ = _as_images(inputs)
        out = []
        for images in loaded_batches(items, batch_size):
            batch = torch.stack([self.encoder.preprocess(im) for im in images])
            regions = self.encoder.regions(batch.to(self.device))
            unfamiliar = unfamiliar_photos(self.familiarity, regions, self.defaults.unfamiliar_threshold)
            out.append(self.embedder(regions, unfamiliar).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embedder.head.proj.out_features), dtype=np.float32)

    def __call__(self, inputs: ImageInput | list[ImageInput], batch_size: int = 16, **options: Any) -> list:
        """Caption one image or many; options as in DecodingOptions.

        An image is a path, the bytes of an image file, a PIL image, or pixels: a numpy array HxWx3 or HxW
        (also HxWx4, HxWx1), or a torch tensor 3xHxW or 1xHxW (channels first, as torchvision makes them;
        a 3-D tensor whose first dimension is 1 or 3 is read so), HxWx3 or HxW. Pixels are uint8 0-255 or
        float in [0, 1] (uint16 and bool arrays work too); tensors may live on any device.
        Many images are a list or tuple of those, or a 4-D batch: a numpy array BxHxWx3 or a tensor
        Bx3xHxW or BxHxWx3, which counts as a list of its B images.

        One image gives [{"generated_text", "score", "concepts"}, ...] (n-best, best first; "concepts"
        lists what the encoder recognised in the image, {"word", "probability"} most probable first, the
        same in each); many give one such list per image. Anything else raises TypeError saying what is accepted; pixels
        of another shape or
        dtype raise ValueError (ImageError) naming them."""
        opts = self.options(**options)
        items, single = _as_images(inputs)
        out = []
        for images in loaded_batches(items, batch_size):
            out += [[{**c, **extras(r)} for c in self.as_dicts(r.captions)] for r in self.generate(images, opts)]
        return out[0] if single else out

    def as_dicts(self, captions: list[Caption]) -> list[dict]:
        """An n-best list in the pipeline's output form."""
        return [caption_dict(c, self.words) for c in captions]

    def attention_maps(self, caption: Caption) -> tuple[list[str], np.ndarray | None]:
        """A caption's words and their attention maps (T, H, W) on the encoder's grid; None for a caption of a
        similar photo (consensus, the concept check), which the decoder did not write, so looked nowhere."""
        if caption.text:
            return caption.text.split(), None
        words = [self.words.itos[t] for t in caption.tokens]
        h, w = self.encoder.grid()
        if not caption.alphas.numel():  # the no-attention baseline looks everywhere alike
            return words, np.full((len(words), h, w), 1.0 / (h * w), dtype=np.float32)
        return words, caption.alphas.reshape(len(words), h, w).numpy()

    def attention(self, image: ImageInput, **options: Any) -> dict:
        """The best caption with its words, each word's attention map (T, H, W; None for a caption of a similar
        photo), and the crop the encoder saw, ready to overlay."""
        items, single = _as_images(image)
        if not single:
            raise TypeError(f"attention takes one image ({ACCEPTED}), not a list or a batch")
        picture = load_image(items[0][0], name=items[0][1])
        best = self.generate([picture], self.options(**options))[0].captions[0]
        words, alphas = self.attention_maps(best)
        return {"generated_text": " ".join(words), "score": best.score, "words": words, "alphas": alphas,
                "image": self.encoder.crop(picture)}


@dataclass
class CaptionResult:
    """One image's n-best captions (best first), the concepts its encoder recognised, (word,
    probability) most probable first (concepts.SHOWN and SHOWN_MOST choose which), its unit vector
    (float32) where the model has an embedder, and the captions of similar photos a retrieval model read,
    (text, cosine) nearest first."""

    captions: list[Caption]
    concepts: list[tuple[str, float]]
    vector: np.ndarray | None = None
    neighbours: list[tuple[str, float]] = field(default_factory=list)  # retrieved captions read, with cosine


def _datastore(path: Path, decoder: Decoder, embedder: ImageEmbedder | None,
               override: str | Path | None) -> Datastore | None:
    """The datastore a retrieval decoder reads (its folder's, or `override`); None for other decoders, which
    refuse an override."""
    if getattr(decoder, "reads_memory", False):
        return model_datastore(path, embedder, override)
    if override is not None:
        raise ValueError(f"{path} does not read retrieved captions: --datastore needs a retrieval model")
    return None


def loaded_batches(items: list[tuple[Any, str | None]], batch_size: int) -> Iterator[list[Image.Image]]:
    """The (input, name) pairs `_as_images` gives, loaded as RGB images, batch_size at a time."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of images, at least 1, got {batch_size!r}")
    for start in range(0, len(items), batch_size):
        yield [load_image(x, name=name) for x, name in items[start:start + batch_size]]


def caption_dict(caption: Caption, words: Vocab) -> dict:
    """One caption in the pipeline's output form; where consensus or the concept check ranked it, its agreement
    and whether the decoder wrote it or it is a caption of a similar photo from the datastore (then it has no
    score)."""
    if caption.agreement is None:
        return {"generated_text": words.decode(caption.tokens), "score": round(caption.score, 4)}
    if caption.text:
        return {"generated_text": caption.text, "score": None, "agreement": round(caption.agreement, 4),
                "source": "datastore"}
    return {"generated_text": words.decode(caption.tokens), "score": round(caption.score, 4),
            "agreement": round(caption.agreement, 4), "source": "decoder"}


def concept_dicts(concepts: list[tuple[str, float]]) -> list[dict]:
    """Concepts in the output form of the Python API, `caption --json`, bulk JSONL and the REST API."""
    return [{"word": word, "probability": round(p, 3)} for word, p in concepts]


def extras(result: CaptionResult) -> dict[str, list[dict]]:
    """What every output carries beside the captions: the concepts, and where a retrieval model read
    them, the captions of similar photos ({"caption", "similarity"}, nearest first)."""
    out = {"concepts": concept_dicts(result.concepts)}
    if result.neighbours:
        out["neighbours"] = [{"caption": text, "similarity": round(sim, 3)} for text, sim in result.neighbours]
    return out


def _as_images(inputs: Any) -> tuple[list[tuple[Any, str | None]], bool]:
    """`Captioner`'s inputs as (what load_image reads, the name its errors use), and whether one image was given."""
    if isinstance(inputs, (list, tuple)) or (isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == 4):
        return [_as_image(x, f"inputs[{i}]") for i, x in enumerate(inputs)], False
    return [_as_image(inputs, None)], True


def _as_image(x: Any, where: str | None) -> tuple[Any, str | None]:
    if isinstance(x, torch.Tensor):
        where = where or "<tensor>"
        return _tensor_pixels(x, where), where
    if isinstance(x, (str, Path)):
        return x, None  # a path names itself
    if isinstance(x, (bytes, Image.Image, np.ndarray)):
        return x, where
    raise TypeError(f"{where + ': ' if where else ''}Captioner takes {ACCEPTED}, or a list or a batch of them; "
                    f"got {type(x).__name__}")


def _tensor_pixels(t: torch.Tensor, name: str) -> np.ndarray:
    """A 3xHxW, 1xHxW, HxWx3 or HxW tensor as the HxWxC (or HxW) array load_image reads."""
    if not (t.ndim == 2 or (t.ndim == 3 and (t.shape[0] in (1, 3) or t.shape[2] in (1, 3, 4)))):
        raise ImageError(f"{name}: expected a 3xHxW, 1xHxW, HxWx3 or HxW tensor, or a batch Bx3xHxW or BxHxWx3, "
                         f"got shape {tuple(t.shape)}")
    t = t.detach().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):  # numpy has no bfloat16
        t = t.float()
    if t.ndim == 3 and t.shape[0] in (1, 3):
        t = t.permute(1, 2, 0)
    return t.numpy()
