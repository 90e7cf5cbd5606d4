"""LSTM-A and LSTM-C (Yao et al., 2017): the attention LSTM reading the encoder's ImageNet classifier.

A decoder trained on 6,000 photos maps a close-up espresso's features to "a dog in the water"; the
classifier, trained on 1.28M photos, still says espresso. Its 1000 class probabilities over the mean
feature (from the head the decoder is given at training and keeps in its weights) enter in two ways:
- concept_input: they also set the initial h and c: semantic attributes as input, LSTM-A.
- concept_copy: each caption word the classes map to (concepts.py's table: tabby -> cat) gets their
  summed probability added to its logit, scaled by a gate of h that learns at which words to copy:
  copying recognised words, LSTM-C: the decoder may leave naming such things to the classifier.
Both layers start at zero, so a plain attention model (init_from) starts this family as itself.
Neither moved the held-out protocol's F1 (docs/experiments/2026-12-05-lstm-a-and-lstm-c.md), so the
shipped model has neither.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decoder_args import ConceptArgs
from .base import State, register_decoder
from .lstm import AttentionLSTM

N_CLASSES = 1000  # ImageNet-1k: the classifier concept_input and concept_copy read


@register_decoder("attention-concepts")
class ConceptLSTM(AttentionLSTM):
    """The soft-attention LSTM whose initial state (concept_input) and next-word logits (concept_copy) also
    read the classifier's class probabilities."""

    Args = ConceptArgs
    title = "Show, Attend and Tell reading the ImageNet classifier (LSTM-A, LSTM-C)"
    output_state = ("concept_words",)
    starts_from = ("attention",)
    added_weights = ("init_concepts.", "classifier_", "copy_gate.", "class_word")

    # buffers: the classifier, fixed but saved with the weights (the model file and its ONNX export carry it)
    classifier_weight: Tensor
    classifier_bias: Tensor
    class_word: Tensor

    def __init__(self, args: ConceptArgs, vocab_size: int, feature_dim: int, words: list[str] | None = None,
                 classifier: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
        """classifier: its weight and bias, and each class's caption word id (0: none); a trained model's
        come from its weights, so None (zeros) will do when loading one."""
        super().__init__(args, vocab_size, feature_dim, words)
        hidden_dim = args.hidden_dim
        if args.concept_input or args.concept_copy:
            weight, bias, word = classifier if classifier is not None else (
                torch.zeros(N_CLASSES, feature_dim), torch.zeros(N_CLASSES), torch.zeros(N_CLASSES, dtype=torch.long))
            if tuple(weight.shape) != (N_CLASSES, feature_dim):
                raise ValueError(f"concept_input and concept_copy need an ImageNet classifier over the {feature_dim} "
                                 f"feature channels, got weights of shape {tuple(weight.shape)}")
            self.register_buffer("classifier_weight", weight.detach().float().clone())
            self.register_buffer("classifier_bias", bias.detach().float().clone())
        if args.concept_copy:
            self.register_buffer("class_word", word.detach().long().clone())
            self.copy_gate = nn.Linear(hidden_dim, 1)
            # softplus(0) = 0.69: a nudge of at most 0.69 to a word's logit to start with, which Adam can
            # grow within an epoch (from a gate near zero it could not: its bias moves about lr per step)
            nn.init.zeros_(self.copy_gate.weight)
            nn.init.zeros_(self.copy_gate.bias)
        if args.concept_input:
            # zero: a model started from one without concept input (init_from) begins as that model
            self.init_concepts = nn.Linear(N_CLASSES, 2 * hidden_dim)
            nn.init.zeros_(self.init_concepts.weight)
            nn.init.zeros_(self.init_concepts.bias)

    def init_state(self, features: Tensor) -> State:
        """The attention LSTM's state, with concept_input h and c moved by the classifier's view of the
        features, and with concept_copy each word's probability by the classifier."""
        state = super().init_state(features)
        if not (self.args.concept_input or self.args.concept_copy):
            return state
        classes = F.linear(features.float().mean(dim=1), self.classifier_weight, self.classifier_bias).softmax(dim=1)
        if self.args.concept_input:
            h, c = state["h"], state["c"]
            h_add, c_add = self.init_concepts(classes.to(h.dtype)).chunk(2, dim=1)
            state.update(h=h + h_add, c=c + c_add)
        if self.args.concept_copy:  # (B, V): each word's summed class probability; <pad> (0) takes the rest.
            # A (1000, V) one-hot product once per batch, not per word: index_add and scatter_add export
            # to ONNX with a fixed batch
            words = classes @ F.one_hot(self.class_word, self.vocab_size).to(classes.dtype)
            state["concept_words"] = words * (torch.arange(self.vocab_size, device=words.device) > 0)
        return state

    def _logits(self, h: Tensor, state: State) -> Tensor:
        """The attention LSTM's logits plus, with concept_copy, the gated concept words of state."""
        logits = super()._logits(h, state)
        if self.args.concept_copy:
            logits = logits + F.softplus(self.copy_gate(h)) * state["concept_words"].to(logits.dtype)
        return logits
