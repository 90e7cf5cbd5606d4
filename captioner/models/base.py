"""The decoder seam: what every caption decoder family provides, and the registry that names them.

A family is one `CaptionDecoder` subclass in its own file, registered under a name (the config's
`decoder` value). Its name and architecture arguments (an `Args` dataclass) are declared torch-free in
decoder_args.py, whose fields `Config` inherits, so a family's options are ordinary flags and YAML keys,
and the model file stores exactly those values. Everything else (training, beam search, saving, serving)
talks to the interface below and never asks which family it has.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Protocol, TypeVar

from torch import Tensor, nn

from ..decoder_args import FAMILIES

State = dict[str, Tensor]  # every tensor has the batch on dim 0, so beam search can reorder it


class Decoder(Protocol):
    """What decoding (greedy, beam search, sampling) steps: a family's decoder, or one that wraps it (a retrieval
    decoder bound to its memory, concepts, an ensemble, ONNX graphs). step gives (rows, V) log-probabilities,
    the new state and the attention."""

    def init_state(self, features: Tensor) -> State: ...

    def step(self, words: Tensor, state: State) -> tuple[Tensor, State, Tensor]: ...


@dataclass
class DecoderOutput:
    """What a teacher-forced pass gives the training objective."""

    logits: Tensor  # (N, V): one row per predicted token, step-major (every running caption's step 0, then 1, ...)
    targets: Tensor  # (N,) the true next tokens, in the same order
    aux_loss: Tensor  # scalar: the family's own regulariser, already weighted (zero when it has none)


class CaptionDecoder(nn.Module):
    """A caption decoder over an encoder's feature map (B, L, C) of L regions with C channels.

    `forward` serves teacher-forced training; `init_state` + `step` serve decoding one word at a time
    (greedy, beam search, sampling). Both must give the same log-probabilities for the same caption:
    tests/test_models.py checks that for every registered family.
    """

    Args: ClassVar[type]  # the family's architecture arguments (a dataclass)
    region_dim: int  # D of regions(): set by each family
    family: ClassVar[str] = ""  # the registered name, set by register_decoder
    title: ClassVar[str] = ""  # what a page or an API description calls the family
    # init_from: the other families whose trained decoder this one may start from, and the state-dict prefixes
    # of the layers it adds to theirs (or to a decoder of its own family without them), left as initialised
    starts_from: ClassVar[tuple[str, ...]] = ()
    added_weights: ClassVar[tuple[str, ...]] = ()

    def __init__(self, args: Any, vocab_size: int, feature_dim: int, words: list[str] | None = None) -> None:
        """`words`: the vocabulary, for families whose embeddings can start from GloVe (build_decoder passes it)."""
        super().__init__()
        self.args, self.vocab_size, self.feature_dim = args, vocab_size, feature_dim

    def image_side(self) -> nn.Module:
        """The part that turns encoder features into the regions the words attend to: what contrastive
        pretraining trains and hands on to caption training."""
        raise NotImplementedError

    def regions(self, features: Tensor) -> Tensor:
        """features (B, L, C) -> (B, L, D) regions, D = region_dim."""
        return self.image_side()(features)

    def init_state(self, features: Tensor) -> State:
        """features (B, L, C) -> the state before the first word; the per-image work happens here, once."""
        raise NotImplementedError

    def step(self, words: Tensor, state: State) -> tuple[Tensor, State, Tensor]:
        """Feed the previous words (B,); return log-probabilities (B, V), the new state and the
        attention over the L regions (B, L) behind this word (L may be 0). Return new tensors for what
        changes: a state tensor handed back as the very same object counts as unchanged (decoding.py)."""
        raise NotImplementedError

    def forward(self, features: Tensor, captions: Tensor, lengths: Tensor, image_index: Tensor | None = None,
                teacher_forcing: float = 1.0) -> DecoderOutput:
        """Teacher-forced pass. captions (B, T) are `<start> w.. <end> <pad>..` sorted by decreasing
        length, lengths (B,) count `<start>`..`<end>`; features are one row per caption, or one per
        image with image_index (B,) naming each caption's image. teacher_forcing < 1 is scheduled
        sampling, for the families that support it."""
        raise NotImplementedError

    def arguments(self) -> dict[str, Any]:
        """The architecture arguments as stored in a model file."""
        return asdict(self.args)


DECODERS: dict[str, type[CaptionDecoder]] = {}
D = TypeVar("D", bound=type[CaptionDecoder])


def register_decoder(name: str) -> Callable[[D], D]:
    """Class decorator: make a family buildable by name. A name registered twice is a bug, not an override;
    so is a name or Args that decoder_args.FAMILIES does not declare (Config would have no flags for them)."""
    def register(cls: D) -> D:
        if name in DECODERS:
            raise ValueError(f"decoder family {name!r} is registered twice ({DECODERS[name].__name__}, {cls.__name__})")
        if FAMILIES.get(name, (None,))[0] is not getattr(cls, "Args", None):
            raise ValueError(f"decoder family {name!r}: declare it and its Args in decoder_args.FAMILIES")
        cls.family = name
        DECODERS[name] = cls
        return cls
    return register


def decoder_class(name: str) -> type[CaptionDecoder]:
    try:
        return DECODERS[name]
    except KeyError:
        raise ValueError(f"unknown decoder family {name!r}; known: {', '.join(sorted(DECODERS))}") from None
