"""Caption decoder families on one seam (base.py), and the model folder (files.py).

Importing this package registers every family: `attention` and `mean` (lstm.py), `attention-concepts`
(lstm_concepts.py), `hard-attention` (hard_attention.py), `transformer` (transformer.py), `retrieval`
(retrieval.py).
"""
from . import hard_attention, lstm, lstm_concepts, retrieval, transformer  # noqa: F401  (registers their families)
from .base import DECODERS, CaptionDecoder, Decoder, DecoderOutput, State, decoder_class, register_decoder
from .files import (
    TUNED,
    LoadedModel,
    average_models,
    build_decoder,
    check_encoder_spec,
    decoder_from_config,
    decoding_defaults,
    load_model,
    model_datastore,
    save_model,
    tuned_weights,
    weights_sha256,
)

__all__ = ["DECODERS", "TUNED", "CaptionDecoder", "Decoder", "DecoderOutput", "LoadedModel", "State", "average_models",
           "build_decoder", "check_encoder_spec", "decoder_class", "decoder_from_config", "decoding_defaults",
           "load_model", "model_datastore", "register_decoder", "save_model", "tuned_weights", "weights_sha256"]
