"""`Captioner`: one call from image to text, in the style of the Hugging Face image-to-text pipeline.

    >>> from captioner import Captioner
    >>> captioner = Captioner.from_pretrained()          # the model shipped in the package
    >>> captioner("photo.jpg")
    [{'generated_text': 'a dog runs through the grass', 'score': -4.1}]
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from .config import resolve_device
from .data import load_image
from .decoding import Caption, beam_search
from .models import load_model

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "flickr8k-lite0"
ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray]


# The one table of allowed decoding options: DecodingOptions checks it, the REST API documents it.
LIMITS: dict[str, tuple[float, float]] = {"beam_size": (1, 20), "max_length": (1, 100), "num_captions": (1, 20),
                                          "length_penalty": (0.0, 5.0)}


class OptionError(ValueError):
    """A decoding option out of range; `field` names it so the CLI and the API can say which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class DecodingOptions:
    """Validated decoding options (frozen, so requests with equal options can be batched together)."""

    beam_size: int = 3
    max_length: int = 20
    length_penalty: float = 0.0
    num_captions: int = 1
    block_trigrams: bool = False

    def __post_init__(self) -> None:
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            kind = float if name == "length_penalty" else int
            if isinstance(value, bool) or not isinstance(value, (kind, int)) or not low <= value <= high:
                what = "a number" if kind is float else "an integer"
                raise OptionError(name, f"{name} must be {what} from {low:g} to {high:g}, got {value!r}")
        if self.num_captions > self.beam_size:
            raise OptionError("num_captions", f"num_captions must be at most beam_size={self.beam_size}, "
                                              f"got {self.num_captions}")


class Captioner:
    """Encoder, decoder and vocabulary of one trained model, with its default decoding options."""

    def __init__(self, encoder: torch.nn.Module, decoder: torch.nn.Module, vocab: Any, defaults: DecodingOptions,
                 device: torch.device, path: Path | None = None) -> None:
        self.encoder, self.decoder, self.vocab = encoder.eval(), decoder.eval(), vocab
        self.defaults, self.device, self.path = defaults, device, path
        self.name = path.name if path is not None else ""

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "auto") -> "Captioner":
        """The shipped default model, or any model folder `captioner train` wrote (runs/NAME/best)."""
        path = Path(path) if path is not None else DEFAULT_MODEL
        dev = resolve_device(device)
        model = load_model(path, dev)
        defaults = DecodingOptions(**model.decoding)
        return cls(model.encoder(dev), model.decoder, model.vocab, defaults, dev, path=path)

    def options(self, **overrides: Any) -> DecodingOptions:
        values = {k: v for k, v in overrides.items() if v is not None}
        base = vars(self.defaults) | values
        if "num_captions" not in values:
            base["num_captions"] = 1
        return DecodingOptions(**base)

    @torch.inference_mode()
    def generate(self, images: list[Image.Image] | torch.Tensor, opts: DecodingOptions) -> list[list[Caption]]:
        """Captions for loaded RGB images, or for a (B, 3, S, S) batch `encoder.preprocess` made, as one batch."""
        if not isinstance(images, torch.Tensor):
            images = torch.stack([self.encoder.preprocess(im) for im in images])
        batch = images.to(self.device)
        features = self.encoder.regions(batch)
        return beam_search(self.decoder, features, beam_size=opts.beam_size, max_length=opts.max_length,
                           length_penalty=opts.length_penalty, block_trigrams=opts.block_trigrams,
                           num_captions=opts.num_captions)

    def __call__(self, inputs: ImageInput | list[ImageInput], batch_size: int = 16, **options: Any) -> list:
        """Paths, PIL images, numpy arrays or bytes, one or a list; options as in DecodingOptions.

        One input gives [{"generated_text", "score"}, ...] (n-best, best first); a list gives one such
        list per input."""
        opts = self.options(**options)
        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        out = []
        for s in range(0, len(items), batch_size):
            images = [load_image(x) for x in items[s:s + batch_size]]
            out += [self.as_dicts(captions) for captions in self.generate(images, opts)]
        return out[0] if single else out

    def as_dicts(self, captions: list[Caption]) -> list[dict]:
        """An n-best list in the pipeline's output form."""
        return [{"generated_text": self.vocab.decode(c.tokens), "score": round(c.score, 4)} for c in captions]

    def attention_maps(self, caption: Caption) -> tuple[list[str], np.ndarray]:
        """A caption's words and their attention maps (T, H, W) on the encoder's grid."""
        words = [self.vocab.itos[t] for t in caption.tokens]
        h, w = self.encoder.grid()
        if not caption.alphas.numel():  # the no-attention baseline looks everywhere alike
            return words, np.full((len(words), h, w), 1.0 / (h * w), dtype=np.float32)
        return words, caption.alphas.reshape(len(words), h, w).numpy()

    def attention(self, image: ImageInput, **options: Any) -> dict:
        """The best caption with its words, each word's attention map (T, H, W), and the crop the
        encoder saw, ready to overlay."""
        picture = load_image(image)
        best = self.generate([picture], self.options(**options))[0][0]
        words, alphas = self.attention_maps(best)
        return {"generated_text": " ".join(words), "score": best.score, "words": words, "alphas": alphas,
                "image": self.encoder.crop(picture)}
