"""A transformer captioner: a small transformer encoder over the image regions, and a pre-norm
transformer decoder whose masked self-attention reads the words so far and whose cross-attention reads
the regions.

Decoding keeps a key/value cache in the state: the regions' cross-attention keys and values are
computed once per image in `init_state` (and handed back unchanged at every step, so beam search never
reorders them), and each step appends one position to every layer's self-attention keys and values
(batch on dim 0, reordered by beam search like any state tensor). A new word therefore costs one
position's work, not a re-run of the prefix; `kv_cache = False` re-runs the prefix instead, kept to
measure what the cache saves and to test that both give the same captions.
"""
from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decoder_args import TransformerArgs
from .base import CaptionDecoder, DecoderOutput, State, register_decoder


class RegionEncoder(nn.Module):
    """Encoder features (B, L, C) on a square grid -> regions (B, L, D): projection, learned row and
    column embeddings, then self-attention among the regions."""

    MAX_SIDE = 32

    def __init__(self, feature_dim: int, args: TransformerArgs) -> None:
        super().__init__()
        d = args.model_dim
        self.project = nn.Sequential(nn.Linear(feature_dim, d), nn.LayerNorm(d))
        self.rows = nn.Embedding(self.MAX_SIDE, d)
        self.cols = nn.Embedding(self.MAX_SIDE, d)
        self.dropout = nn.Dropout(args.transformer_dropout)
        layer = nn.TransformerEncoderLayer(d, args.transformer_heads, args.ff_dim, args.transformer_dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, args.encoder_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, features: Tensor) -> Tensor:
        side = math.isqrt(features.shape[1])
        if side * side != features.shape[1] or side > self.MAX_SIDE:
            raise ValueError(f"the transformer needs a square feature grid of at most {self.MAX_SIDE} x "
                             f"{self.MAX_SIDE}, got {features.shape[1]} regions")
        index = torch.arange(side, device=features.device)
        position = (self.rows(index)[:, None] + self.cols(index)[None, :]).reshape(side * side, -1)
        x = self.dropout(self.project(features) + position)
        return self.norm(self.layers(x))


def word_positions(start: int, length: int, dim: int, device: torch.device) -> Tensor:
    """Sinusoidal positions start..start+length-1 (length, dim): any caption length, no table to outgrow."""
    position = torch.arange(start, start + length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = position * freq
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :dim]


class Attention(nn.Module):
    """Multi-head attention through scaled_dot_product_attention, with its keys and values exposed so
    decoding can cache them."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def split(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, heads, T, D/heads)"""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.key_value(x).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
        q = self.split(self.query(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).flatten(2))

    def weights(self, x: Tensor, k: Tensor) -> Tensor:
        """Attention weights (B, T, L) of queries x over keys k, averaged over heads: the picture of
        where a word looked."""
        q = self.split(self.query(x))
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1).mean(dim=1)


class DecoderLayer(nn.Module):
    """Pre-norm: x + self-attention, + cross-attention to the regions, + feed-forward."""

    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        d = args.model_dim
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = Attention(d, args.transformer_heads, args.transformer_dropout)
        self.cross_attn = Attention(d, args.transformer_heads, args.transformer_dropout)
        self.ff = nn.Sequential(nn.Linear(d, args.ff_dim), nn.GELU(), nn.Dropout(args.transformer_dropout),
                                nn.Linear(args.ff_dim, d))
        self.dropout = nn.Dropout(args.transformer_dropout)

    def forward(self, x: Tensor, self_k: Tensor, self_v: Tensor, memory_k: Tensor, memory_v: Tensor,
                causal: bool) -> tuple[Tensor, Tensor]:
        """The new x, and the cross-attention's queries (what the attention pictures are made from)."""
        x = x + self.dropout(self.self_attn(self.norm1(x), self_k, self_v, causal=causal))
        query = self.norm2(x)
        x = x + self.dropout(self.cross_attn(query, memory_k, memory_v))
        return x + self.dropout(self.ff(self.norm3(x))), query


@register_decoder("transformer")
class TransformerCaptioner(CaptionDecoder):
    Args = TransformerArgs
    title = "a transformer decoder"
    kv_cache = True  # False: every step re-runs the whole prefix (for measuring and testing the cache)

    def __init__(self, args: TransformerArgs, vocab_size: int, feature_dim: int,
                 words: list[str] | None = None) -> None:
        super().__init__(args, vocab_size, feature_dim)
        if args.model_dim % args.transformer_heads:
            raise ValueError(f"model_dim ({args.model_dim}) must be a multiple of transformer_heads "
                             f"({args.transformer_heads})")
        d = self.region_dim = args.model_dim
        self.image = RegionEncoder(feature_dim, args)
        self.embed = nn.Embedding(vocab_size, d)
        nn.init.normal_(self.embed.weight, std=d ** -0.5)
        self.dropout = nn.Dropout(args.transformer_dropout)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.transformer_layers))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab_size)
        if args.tie_embeddings:
            self.out.weight = self.embed.weight

    def image_side(self) -> nn.Module:
        return self.image

    def decoder_layers(self) -> list[DecoderLayer]:
        """self.layers with their type: iterating an nn.ModuleList gives plain Modules."""
        return cast("list[DecoderLayer]", list(self.layers))

    def _words(self, words: Tensor, start: int) -> Tensor:
        """(B, T) ids from position `start` -> (B, T, D) scaled embeddings plus positions."""
        x = self.embed(words) * math.sqrt(self.region_dim)
        return self.dropout(x + word_positions(start, words.shape[1], self.region_dim, words.device).to(x.dtype))

    def _memory(self, regions: Tensor) -> State:
        state = {}
        for i, layer in enumerate(self.decoder_layers()):
            state[f"memory_k{i}"], state[f"memory_v{i}"] = layer.cross_attn.keys_values(regions)
        return state

    def forward(self, features: Tensor, captions: Tensor, lengths: Tensor, image_index: Tensor | None = None,
                teacher_forcing: float = 1.0) -> DecoderOutput:
        """All positions at once under a causal mask; the region encoder and the cross-attention keys
        run once per image."""
        if teacher_forcing < 1.0:
            raise ValueError("the transformer decoder trains with teacher forcing only: set teacher_forcing_start "
                             "and teacher_forcing_end to 1.0")
        state = self._memory(self.regions(features))
        if image_index is not None:
            state = {k: v[image_index] for k, v in state.items()}
        steps = int(lengths[0]) - 1
        x = self._words(captions[:, :steps], 0)
        hidden = self.norm(self._stack(x, state)[0])
        running = (lengths - 1).unsqueeze(1) > torch.arange(steps, device=lengths.device)  # (B, T-1)
        order = running.t()  # step-major, as the seam asks
        logits = self.out(hidden.transpose(0, 1)[order])
        targets = captions[:, 1:steps + 1].t()[order]
        return DecoderOutput(logits, targets, logits.new_zeros(()))

    def init_state(self, features: Tensor) -> State:
        state = self._memory(self.regions(features))
        batch = features.shape[0]
        if self.kv_cache:
            for i in range(len(self.layers)):
                heads = self.args.transformer_heads
                empty = state["memory_k0"].new_zeros(batch, heads, 0, self.region_dim // heads)
                state[f"self_k{i}"], state[f"self_v{i}"] = empty, empty
        else:
            state["prefix"] = torch.zeros(batch, 0, dtype=torch.long, device=features.device)
        return state

    def _stack(self, x: Tensor, state: State) -> tuple[Tensor, Tensor]:
        """The decoder layers over all positions of x (causal), each layer's keys and values from its
        own input: (hidden states, the last layer's cross-attention queries)."""
        for i, layer in enumerate(self.decoder_layers()):
            k, v = layer.self_attn.keys_values(layer.norm1(x))
            x, query = layer(x, k, v, state[f"memory_k{i}"], state[f"memory_v{i}"], causal=True)
        return x, query

    def step(self, words: Tensor, state: State) -> tuple[Tensor, State, Tensor]:
        new = dict(state)
        if self.kv_cache:  # one new position; its keys and values join each layer's cache
            x = self._words(words[:, None], state["self_k0"].shape[2])  # the cache's length is its position
            for i, layer in enumerate(self.decoder_layers()):
                k, v = layer.self_attn.keys_values(layer.norm1(x))
                new[f"self_k{i}"] = torch.cat([state[f"self_k{i}"], k], dim=2)
                new[f"self_v{i}"] = torch.cat([state[f"self_v{i}"], v], dim=2)
                x, query = layer(x, new[f"self_k{i}"], new[f"self_v{i}"], state[f"memory_k{i}"],
                                 state[f"memory_v{i}"], causal=False)
        else:  # the whole prefix again, keeping its last position
            new["prefix"] = torch.cat([state["prefix"], words[:, None]], dim=1)
            x, query = self._stack(self._words(new["prefix"], 0), state)
            x, query = x[:, -1:], query[:, -1:]
        logprobs = F.log_softmax(self.out(self.norm(x[:, 0])).float(), dim=-1)
        last = len(self.layers) - 1  # the picture: the last layer's cross-attention, averaged over heads
        alpha = self.decoder_layers()[last].cross_attn.weights(query, state[f"memory_k{last}"])[:, 0]
        return logprobs, new, alpha
