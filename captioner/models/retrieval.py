"""Show, Attend and Tell reading retrieved captions: retrieval-augmented captioning with a copy path.

The decoder learned its language from Flickr8k's 30,000 captions; a datastore of human captions of
other photos (datastore.py) knows kitchens, buses and giraffes. For each photo the pipeline retrieves
the `neighbours` captions nearest its image vector and hands their words to this decoder as `memory`
(B, M) token ids, M = neighbours x memory_length, 0 for padding. The decoder
- encodes them once per image: word embeddings, a bidirectional GRU over each caption, plus an
  embedding of the neighbour's rank, and one learned slot that is always there (so attention is
  defined for a photo with no neighbours: `--no-retrieval`);
- reads them at every step (memory_read): an additive attention from h over the memory, whose context
  enters the LSTM beside the image context (like SmallCap's prompt, which GPT-2 reads beside the image);
- copies from them (pointer-generator, See et al. 2017): a second attention from the new h gives a
  distribution over the memory's words, and a gate of h mixes it with the vocabulary softmax, so a
  word the decoder's own captions never taught it is written when the neighbours carry it.

The vocabulary is the training captions' plus the datastore's frequent words (`prepare
--extra-vocabulary`), so the copied words have ids and embeddings (GloVe, through `glove`). Training
retrieves leave-one-out (a photo's own captions are never its neighbours) with the same image vector
as at inference. `step` returns log-probabilities of the mixture, and `forward` returns them as its
"logits": cross-entropy over log-probabilities is their negative log-likelihood (log_softmax of a
log-probability vector is itself).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from ..datastore import Neighbours
from ..decoder_args import RetrievalArgs
from ..vocab import UNK_ID, Vocab, tokenize
from .base import DecoderOutput, State, register_decoder
from .lstm import AttentionLSTM

if TYPE_CHECKING:
    from ..datastore import Datastore

NAMED_FLOOR = 0.02  # concept words less probable than this lift a caption by at most 0.006: not looked up
TINY = 1e-9  # floor of a mixture probability before its log (a word neither path gives)
GATE_START = 3.0  # the copy gate's start: sigmoid(3) = 0.95 of each word's probability from the vocabulary


@register_decoder("retrieval")
class RetrievalLSTM(AttentionLSTM):
    """The soft-attention LSTM that also attends over, and copies from, retrieved captions."""

    Args = RetrievalArgs
    title = "Show, Attend and Tell reading retrieved captions (retrieval-augmented, with a copy path)"
    reads_memory = True
    # init_from a trained attention model (the shipped one): its weights load as they are, and what this family
    # adds starts where the LSTM is unchanged (lstm_memory zero) and the vocabulary softmax has the most say
    output_state = ("copy_keys", "memory_mask", "memory", "memory_ids")  # what the copy mixture reads
    starts_from = ("attention",)
    added_weights = ("memory_", "init_memory.", "read_", "copy_", "lstm_memory.", "generate_gate.")

    def __init__(self, args: RetrievalArgs, vocab_size: int, feature_dim: int, words: list[str] | None = None,
                 **extra) -> None:
        super().__init__(args, vocab_size, feature_dim, words, **extra)
        hidden, memory_dim = args.hidden_dim, args.memory_dim
        attention = memory_dim
        self.memory_rnn = nn.GRU(args.embed_dim, memory_dim // 2, batch_first=True, bidirectional=True)
        self.memory_rank = nn.Embedding(args.neighbours + 1, memory_dim)  # rank 0: the learned slot
        self.memory_slot = nn.Parameter(torch.zeros(memory_dim))
        if args.memory_read:
            self.init_memory = nn.Linear(memory_dim, 2 * hidden)
            nn.init.zeros_(self.init_memory.weight)
            nn.init.zeros_(self.init_memory.bias)
            self.read_key = nn.Linear(memory_dim, attention)
            self.read_hidden = nn.Linear(hidden, attention)
            self.read_score = nn.Linear(attention, 1)
            self.lstm_memory = nn.Linear(memory_dim, 4 * hidden, bias=False)
            nn.init.zeros_(self.lstm_memory.weight)
        self.copy_key = nn.Linear(memory_dim, attention)
        self.copy_hidden = nn.Linear(hidden, attention)
        self.copy_score = nn.Linear(attention, 1)
        self.generate_gate = nn.Linear(hidden + memory_dim, 1)
        nn.init.constant_(self.generate_gate.bias, GATE_START)

    @property
    def memory_size(self) -> int:
        return self.args.neighbours * self.args.memory_length

    def encode_memory(self, memory: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """memory (B, M) ids -> (encoded (B, 1 + M, D), ids (B, 1 + M), mask (B, 1 + M) True where real).
        Position 0 is the learned slot; its id is <pad> (0), which decoding never writes."""
        batch = memory.shape[0]
        k, length = self.args.neighbours, self.args.memory_length
        if memory.shape[1] != k * length:
            raise ValueError(f"memory must hold {k} captions of {length} tokens ({k * length}), got {memory.shape[1]}")
        ids = memory.long()
        words = self.embed_proj(self.embed(ids.view(batch * k, length)))
        encoded, _ = self.memory_rnn(self.dropout(words) if self.training else words)
        ranks = torch.arange(1, k + 1, device=memory.device).repeat_interleave(length)
        encoded = encoded.reshape(batch, k * length, -1) + self.memory_rank(ranks)
        slot = (self.memory_slot + self.memory_rank.weight[0]).expand(batch, 1, -1)
        encoded = torch.cat([slot.to(encoded.dtype), encoded], dim=1)
        ids = torch.cat([ids.new_zeros(batch, 1), ids], dim=1)
        mask = ids > 0
        mask[:, 0] = True
        return encoded, ids, mask

    def init_state(self, features: Tensor, memory: Tensor | None = None) -> State:
        """As the attention LSTM's, plus the encoded memory and its attention keys; no memory (None)
        reads only the learned slot."""
        state = super().init_state(features)
        if memory is None:
            memory = torch.zeros(features.shape[0], self.memory_size, dtype=torch.long, device=features.device)
        encoded, ids, mask = self.encode_memory(memory)
        state.update(memory=encoded, memory_ids=ids, memory_mask=mask, copy_keys=self.copy_key(encoded))
        if self.args.memory_read:
            real = mask.to(encoded.dtype).unsqueeze(2)
            pooled = (encoded * real).sum(dim=1) / real.sum(dim=1)
            h_add, c_add = self.init_memory(pooled).chunk(2, dim=1)
            state.update(h=state["h"] + h_add, c=state["c"] + c_add, read_keys=self.read_key(encoded))
        return state

    def _memory_attention(self, keys: Tensor, mask: Tensor, query: Tensor, score: nn.Linear) -> Tensor:
        """Additive attention weights (B, 1 + M) over the memory, zero on padding."""
        scores = score(torch.tanh(keys + query.unsqueeze(1))).squeeze(2).float()
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)

    def _advance(self, word_gates: Tensor, state: State) -> tuple[Tensor, Tensor, Tensor]:
        """One LSTM step reading the image regions and (memory_read) the memory with h of the previous step."""
        if not self.args.memory_read:
            return super()._advance(word_gates, state)
        h_prev = state["h"]
        read = self._memory_attention(state["read_keys"], state["memory_mask"], self.read_hidden(h_prev),
                                      self.read_score)
        reading = torch.bmm(read.unsqueeze(1).to(state["memory"].dtype), state["memory"]).squeeze(1)
        return super()._advance(word_gates + self.lstm_memory(reading), state)

    def _logits(self, h: Tensor, state: State) -> Tensor:
        """Log-probabilities (B, V): the gate's share of the vocabulary softmax plus the rest spread over the
        memory's words by the copy attention of h (cross-entropy over them is their negative log-likelihood:
        log_softmax of log-probabilities is themselves). Training with copy_hide, a share of the rows whose
        target ("targets") the memory holds get nothing from the softmax for it, so only the copy path can."""
        copy = self._memory_attention(state["copy_keys"], state["memory_mask"], self.copy_hidden(h),
                                      self.copy_score)
        copied = torch.bmm(copy.unsqueeze(1).to(state["memory"].dtype), state["memory"]).squeeze(1)
        gate = self.generate_gate(torch.cat([h, copied], dim=1)).float()
        generate = torch.sigmoid(gate if self.training else gate + self.args.generate_bias)
        logits = self.out(self.dropout(h)).float()
        targets = state.get("targets")
        if targets is not None and self.training and self.args.copy_hide > 0:
            in_memory = (state["memory_ids"][:, 1:] == targets.unsqueeze(1)).any(dim=1)
            drawn = torch.rand(len(targets), device=targets.device) < self.args.copy_hide
            rows = torch.nonzero(in_memory & drawn & (targets > UNK_ID)).squeeze(1)
            logits = logits.index_put((rows, targets[rows]), logits.new_tensor(float("-inf")))
        vocab = torch.softmax(logits, dim=1)
        mixed = (generate * vocab).scatter_add(1, state["memory_ids"], (1 - generate) * copy)
        return torch.log(mixed.clamp_min(TINY))

    def step(self, words: Tensor, state: State) -> tuple[Tensor, State, Tensor]:
        h, c, alpha = self._advance(self.word_gates(words), state)
        return self._logits(h, state), {**state, "h": h, "c": c}, alpha  # already log-probabilities

    def forward(self, features: Tensor, captions: Tensor, lengths: Tensor, image_index: Tensor | None = None,
                teacher_forcing: float = 1.0, **inputs: Tensor | None) -> DecoderOutput:
        """The attention LSTM's teacher-forced pass reading inputs["memory"] (one row per image of features);
        its "logits" are the mixture's log-probabilities. While training, memory_dropout of the images read no
        neighbours."""
        memory = inputs.get("memory")
        if teacher_forcing < 1.0:
            raise ValueError("the retrieval decoder trains with teacher forcing only (teacher_forcing 1)")
        if memory is not None and self.training and self.args.memory_dropout > 0:
            hidden = torch.rand(memory.shape[0], device=memory.device) < self.args.memory_dropout
            memory = memory.masked_fill(hidden.unsqueeze(1), 0)
        return super().forward(features, captions, lengths, image_index, memory=memory)

    def reading(self, memory: Tensor) -> WithMemory:
        """This decoder for beam search over photos whose retrieved captions are `memory` (B, M)."""
        return WithMemory(self, memory)


class WithMemory:
    """A retrieval decoder bound to a batch's memory: the models.base.Decoder protocol (init_state(features),
    step), so beam search, concepts and every other wrapper work unchanged."""

    def __init__(self, decoder: RetrievalLSTM, memory: Tensor) -> None:
        self.inner, self.memory = decoder, memory

    def init_state(self, features: Tensor) -> State:
        return self.inner.init_state(features, self.memory.to(features.device))

    def step(self, words: Tensor, state: State) -> tuple[Tensor, State, Tensor]:
        return self.inner.step(words, state)


def memory_tokens(captions: Sequence[Sequence[str]], vocab: Vocab, neighbours: int, length: int) -> Tensor:
    """Retrieved captions, per photo, as the decoder's memory (B, neighbours x length): each caption's first
    `length` tokens in its slot, <unk> for words outside the vocabulary, 0 (padding) after them and in the
    slots of missing neighbours."""
    memory = torch.zeros(len(captions), neighbours * length, dtype=torch.long)
    for i, texts in enumerate(captions):
        for j, text in enumerate(texts[:neighbours]):
            ids = [vocab.stoi.get(word, vocab.unk) for word in tokenize(text)[:length]]
            memory[i, j * length:j * length + len(ids)] = torch.tensor(ids, dtype=torch.long)
    return memory


def neighbours_read(args: RetrievalArgs, k: int | None) -> int:
    """How many retrieved captions the memory holds when k are asked for: at most the trained neighbours
    (the rest retrieved only vote, consensus.py)."""
    return min(k or args.neighbours, args.neighbours)


def retrieve(datastore: Datastore, vectors: np.ndarray, vocab: Vocab, args: RetrievalArgs, k: int | None = None,
             exclude: Sequence[int | None] | None = None, concept_probs: np.ndarray | None = None,
             concept_words: Sequence[str] = (), concept_weight: float = 0.0,
             voters: int = 0) -> tuple[Tensor, Neighbours]:
    """The memory of photos with unit image vectors (B, D): their k (at most args.neighbours) nearest captions
    in the datastore, leaving out group exclude[i] for photo i (training's leave-one-out). With concept_probs
    (B, W) of concept_words (concepts.py) and a weight, every caption ranks by cosine + weight x the summed
    probability of the concept words it names (those of probability NAMED_FLOOR or more): the ImageNet head
    knows an espresso that the image vector, trained on Flickr8k, takes for a dog in water. The neighbours
    returned are the first max(k, voters) (consensus.py's voters); the memory holds the first k."""
    k = neighbours_read(args, k)
    boosts = None
    if concept_probs is not None and concept_weight > 0:
        boosts = [[(datastore.index.rows_naming(concept_words[j]), concept_weight * float(probs[j]))
                   for j in np.flatnonzero(probs >= NAMED_FLOOR).tolist()] for probs in concept_probs]
    found = datastore.search(vectors, max(k, voters), exclude, boosts)
    return memory_tokens([texts[:k] for texts in found.texts], vocab, args.neighbours, args.memory_length), found
