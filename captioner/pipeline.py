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
from .decoders import load_model
from .decoding import Caption, beam_search
from .encoders import create_encoder

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "flickr8k-lite0"
ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray]


@dataclass
class DecodingOptions:
    """Validated decoding options; a bad value names its field so the CLI and the API can say which."""

    beam_size: int = 3
    max_length: int = 20
    length_penalty: float = 0.0
    num_captions: int = 1
    block_trigrams: bool = False

    def __post_init__(self) -> None:
        limits = {"beam_size": (1, 20), "max_length": (1, 100), "num_captions": (1, self.beam_size)}
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")
        if not 0.0 <= self.length_penalty <= 5.0:
            raise ValueError(f"length_penalty must be from 0 to 5, got {self.length_penalty!r}")


class Captioner:
    """Encoder, decoder and vocabulary of one trained model, with its default decoding options."""

    def __init__(self, encoder: torch.nn.Module, decoder: torch.nn.Module, vocab: Any, defaults: DecodingOptions,
                 device: torch.device, name: str = "") -> None:
        self.encoder, self.decoder, self.vocab = encoder.eval(), decoder.eval(), vocab
        self.defaults, self.device, self.name = defaults, device, name

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "auto") -> "Captioner":
        """The shipped default model, or any model folder `captioner train` wrote (runs/NAME/best)."""
        path = Path(path) if path is not None else DEFAULT_MODEL
        dev = resolve_device(device)
        decoder, cfg, vocab, spec, encoder_state = load_model(path, dev)
        encoder = create_encoder(spec["encoder"], pretrained=encoder_state is None,
                                 image_size=spec["image_size"], layer=spec["layer"])
        if encoder_state is not None:
            encoder.load_state_dict(encoder_state)
        defaults = DecodingOptions(cfg.beam_size, cfg.max_length, cfg.length_penalty, 1, cfg.block_trigrams)
        return cls(encoder.to(dev), decoder, vocab, defaults, dev, name=path.name)

    def options(self, **overrides: Any) -> DecodingOptions:
        values = {k: v for k, v in overrides.items() if v is not None}
        base = vars(self.defaults) | values
        if "num_captions" not in values:
            base["num_captions"] = 1
        return DecodingOptions(**base)

    @torch.inference_mode()
    def generate(self, images: list[Image.Image], opts: DecodingOptions) -> list[list[Caption]]:
        """Captions for already-loaded RGB images, as one batch."""
        batch = torch.stack([self.encoder.preprocess(im) for im in images]).to(self.device)
        features = self.encoder(batch).flatten(2).transpose(1, 2)
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
