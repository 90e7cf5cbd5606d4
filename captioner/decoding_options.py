"""The decoding options: the one table of their names, defaults, ranges and help.

`DecodingOptions` validates them. Everything else derives from its fields: the Config's decoding
fields (the defaults a trained model keeps) and through them the CLI's flags, the keys a model
folder stores, the REST API's schema and the page's controls. Torch-free, so the Config and
`captioner --help` read it without loading torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any


class OptionError(ValueError):
    """A decoding option out of range; `field` names it so the CLI and the API can say which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _option(default: Any, help: str, range: tuple[float, float] | None = None, per_request: bool = False) -> Any:
    """A field with its help and (inclusive) range; `per_request`: chosen per call, never a model's default."""
    return field(default=default, metadata={"help": help, "range": range, "per_request": per_request})


@dataclass(frozen=True)
class DecodingOptions:
    """Validated decoding options (frozen, so requests with equal options can be batched together)."""

    beam_size: int = _option(3, "beam size", (1, 20))
    max_length: int = _option(20, "most words per caption", (1, 100))
    length_penalty: float = _option(0.0, "beams ranked by log-probability / length**penalty; 0: total "
                                         "log-probability", (0.0, 5.0))
    num_captions: int = _option(1, "n-best captions per image (at most beam_size)", (1, 20), per_request=True)
    block_trigrams: bool = _option(False, "forbid a beam to repeat a word trigram")
    concepts: bool = _option(True, "mention what the encoder's ImageNet head recognises (a cat, an espresso), "
                                   "even words the model never learned; off: the decoder alone")
    concept_threshold: float = _option(0.3, "how probable a concept must be to be favoured in the caption",
                                       (0.01, 1.0))
    retrieval: bool = _option(True, "read the captions of similar photos from the model's datastore while writing "
                                    "(retrieval-augmented models); off: the image alone")
    retrieved: int = _option(4, "retrieved captions read per photo (at most as many as the model was trained "
                                "with)", (1, 16))
    retrieval_concepts: float = _option(0.3, "how much the concept words a caption names count in retrieving it "
                                             "(the encoder's ImageNet head); 0: the image vector alone", (0.0, 2.0))
    consensus: bool = _option(False, "retrieval models: choose, among the decoder's n-best and the captions of the "
                                     "25 most similar photos, the caption those captions agree with most; off: the "
                                     "decoder's best")
    concept_check: bool = _option(True, "retrieval models, concepts on: where the caption names a thing the ImageNet "
                                        "head reliably sees but not here (a dog, for a cup of coffee) and leaves out "
                                        "a concept of at least concept_threshold, the captions of the 25 most "
                                        "similar photos choose one of themselves (consensus); off: the decoder's "
                                        "caption stands")
    decoder_lean: float = _option(0.1, "consensus: agreement added to the decoder's own captions; higher keeps "
                                       "them more often, 1: always", (0.0, 1.0))
    unfamiliar_threshold: float = _option(0.9, "retrieval models with a familiarity check (the shipped model has "
                                                "one): for a photo it gives more than this probability of being "
                                                "unlike the model's training photos (a kitchen, for a Flickr8k "
                                                "model), the captions of the 25 most similar photos vote as with "
                                                "consensus, the decoder's with no lead, and they are retrieved "
                                                "with the library head's vectors where the model has one "
                                                "(captioner adapt); 1: never", (0.0, 1.0))

    def __post_init__(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            if kind is bool:
                if not isinstance(value, bool):
                    raise OptionError(f.name, f"{f.name} must be true or false, got {value!r}")
                continue
            low, high = f.metadata["range"]
            if isinstance(value, bool) or not isinstance(value, (kind, int)) or not low <= value <= high:
                what = "a number" if kind is float else "an integer"
                raise OptionError(f.name, f"{f.name} must be {what} from {low:g} to {high:g}, got {value!r}")
        if self.num_captions > self.beam_size:
            raise OptionError("num_captions", f"num_captions ({self.num_captions}) must be at most beam_size "
                                              f"({self.beam_size})")


OPTIONS: dict[str, dataclasses.Field] = {f.name: f for f in fields(DecodingOptions)}
# The options with a range, as the REST API documents them.
LIMITS: dict[str, tuple[float, float]] = {name: f.metadata["range"] for name, f in OPTIONS.items()
                                          if f.metadata["range"] is not None}
# What a model folder keeps as its defaults: every option but those chosen per request.
MODEL_KEYS: tuple[str, ...] = tuple(name for name, f in OPTIONS.items() if not f.metadata["per_request"])
# A model folder written before an option existed decodes with the option's default.
MODEL_DEFAULTS: dict[str, Any] = {name: OPTIONS[name].default for name in MODEL_KEYS}


def config_field(name: str) -> Any:
    """The Config field of decoding option `name`: its default, help and range, from the table above."""
    f = OPTIONS[name]
    meta = {"help": f.metadata["help"]}
    if f.metadata["range"] is not None:
        meta["range"] = f.metadata["range"]
    return field(default=f.default, metadata=meta)
