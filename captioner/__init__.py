"""captioner: neural image captioning on EfficientNet-Lite features (Show, Attend and Tell or a transformer decoder)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .config import Config
    from .pipeline import Captioner


def __getattr__(name: str) -> Any:
    """Import torch-heavy parts on first use, so `captioner --help` starts fast."""
    if name == "Captioner":
        from .pipeline import Captioner
        return Captioner
    if name == "Config":
        from .config import Config
        return Config
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
