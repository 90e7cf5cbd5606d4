"""Turning a decoder's next-word distributions into captions: greedy decoding and beam search.

Both search a whole batch of images at once. Beam search flattens images and beams into B*K rows, so
each step is a single `decoder.step` call however many images and beams there are, and the bookkeeping
is a handful of small tensor operations: finished captions are kept as (score, step, candidate) entries
and the words and attention weights are rebuilt from per-step backpointers once the search is over.

Only the `Decoder` protocol below is used. Its state is a dict of tensors with the batch on dim 0, so
following the beams means `index_select` on every tensor. `step` must return new tensors for what it
changes instead of writing into the old ones: a tensor that it hands back as the very same object is
taken as unchanged, and when it came from `init_state` it is still identical across an image's beams,
so beam search does not reorder it (for the attention decoder these are the feature map and its
projection, by far the largest tensors in the state).

Scores: a caption's `logprob` is the sum of the decoder's log-probabilities of its words (and of <end>
when it finished); forbidden words are removed without renormalising. Its `score`, which ranks beam
search results, is logprob / length**length_penalty where length counts the words and <end>: 0 ranks by
total log-probability, which favours short captions because every word costs probability; 1 ranks by
mean log-probability per word; values in between trade the two off.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from captioner.decoders import State

INF = float("inf")


class Decoder(Protocol):
    def init_state(self, features: Tensor) -> State: ...

    def step(self, words: Tensor, state: State) -> tuple[Tensor, State, Tensor]: ...


@dataclass
class Caption:
    tokens: list[int]  # word ids, without <start> and <end>
    logprob: float  # total log-probability of the tokens, and of <end> when finished
    score: float  # the ranking score: logprob / length**length_penalty
    finished: bool  # ended with <end> within max_length words
    alphas: Tensor  # (len(tokens), L) float32 CPU attention weights of each word; L is 0 without attention


@torch.no_grad()
def greedy(decoder: Decoder, features: Tensor, max_length: int = 20, end: int = 2, start: int = 1,
           forbid: Sequence[int] = (0, 1, 3)) -> list[Caption]:
    """The most probable allowed word at every step, for each of the B images in features (B, L, C).

    The fast baseline, and exactly what beam search with beam_size=1 finds. `forbid` lists words never
    emitted: <pad>, <start> and, unless the caller allows it, <unk>.
    """
    batch, device = features.shape[0], features.device
    forbidden = torch.tensor(forbid, dtype=torch.long, device=device)
    state = decoder.init_state(features)
    words = torch.full((batch,), start, dtype=torch.long, device=device)
    logprob = torch.zeros(batch, device=device)
    length = torch.full((batch,), max_length, dtype=torch.long, device=device)  # words before <end>
    running = torch.ones(batch, dtype=torch.bool, device=device)
    chosen, alphas = [], []
    for t in range(max_length):
        logprobs, state, alpha = decoder.step(words, state)
        best, words = logprobs.float().index_fill(1, forbidden, -INF).max(dim=1)
        logprob = torch.where(running, logprob + best, logprob)
        chosen.append(words)
        alphas.append(alpha)
        ended = running & (words == end)
        length = torch.where(ended, t, length)
        running = running & ~ended
        if not bool(running.any()):
            break
    tokens = torch.stack(chosen, dim=1).cpu()
    attention = torch.stack(alphas, dim=1).float().cpu()
    return [Caption(tokens[b, :n].tolist(), lp, lp, n < max_length, attention[b, :n].clone())
            for b, (n, lp) in enumerate(zip(length.tolist(), logprob.tolist()))]


def _score(logprob: Tensor, length: int, length_penalty: float) -> Tensor:
    return logprob / float(length) ** length_penalty


def _block_repeated_trigrams(scores: Tensor, seqs: Tensor) -> None:
    """Set to -inf, in place, the score of each word that would complete a trigram its row of seqs
    (hypotheses, words so far) already contains, so that captions cannot loop on a phrase."""
    n = seqs.shape[1]
    if n < 3:
        return
    # earlier trigram i is (seqs[i], seqs[i+1], seqs[i+2]); it repeats if its first two words are the last two
    same_start = (seqs[:, : n - 2] == seqs[:, n - 2 : n - 1]) & (seqs[:, 1 : n - 1] == seqs[:, n - 1 :])
    scores.scatter_reduce_(1, seqs[:, 2:], torch.where(same_start, -INF, INF), reduce="amin")


@torch.no_grad()
def beam_search(decoder: Decoder, features: Tensor, beam_size: int = 3, max_length: int = 20,
                length_penalty: float = 0.0, block_trigrams: bool = False, num_captions: int = 1,
                start: int = 1, end: int = 2, forbid: Sequence[int] = (0, 1, 3)) -> list[list[Caption]]:
    """The num_captions best captions of at most max_length words for each image in features (B, L, C),
    best first.

    Each step extends the K = beam_size live hypotheses of an image by every allowed word and keeps the
    K best extensions. An <end> among those K finishes a caption (so beam_size=1 is greedy decoding),
    and the next best extensions that do not end take its place, so K hypotheses stay live. An image is
    done when its num_captions-th finished caption scores at least as well as any live hypothesis
    could still score; the search stops when every image is done or after max_length words. Finished
    captions come first; if an image has fewer than num_captions, its best unfinished ones (cut at
    max_length words, finished=False) fill the list. With length_penalty > 0 a longer caption may
    still win, so the search usually runs to max_length and beam_size=1 may outdo greedy.
    block_trigrams forbids a word that would repeat a trigram of the hypothesis. `forbid` is as in
    `greedy`.
    """
    if not 1 <= num_captions <= beam_size:
        raise ValueError(f"num_captions must be between 1 and beam_size ({beam_size}), not {num_captions}")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, not {max_length}")
    batch, k, device = features.shape[0], beam_size, features.device
    forbidden = torch.tensor(forbid, dtype=torch.long, device=device)
    state = {name: v.repeat_interleave(k, dim=0) for name, v in decoder.init_state(features).items()}
    shared = set(state)  # tensors still identical across an image's beams: reordering would not change them
    words = torch.full((batch * k,), start, dtype=torch.long, device=device)
    live = torch.full((batch, k), -INF, device=device)  # log-probability of each live hypothesis
    live[:, 0] = 0.0  # the K beams start identical: only one may be extended, or they would stay copies
    first_row = torch.arange(batch, device=device).unsqueeze(1) * k
    pool_score = torch.full((batch, num_captions), -INF, device=device)  # finished captions, best first,
    pool_id = torch.zeros((batch, num_captions), dtype=torch.long, device=device)  # as step * K + candidate
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    seqs = words.new_empty(batch * k, 0)  # the live hypotheses' words, kept only for trigram blocking
    # per step: each new live row's word and parent row, alpha by parent row, and the first K candidates'
    # log-probabilities and parent rows (where a finished caption comes from)
    step_words, step_parents, step_alphas, step_logprobs, step_sources = [], [], [], [], []
    for t in range(max_length):
        logprobs, new_state, alpha = decoder.step(words, state)
        scores = live.view(-1, 1) + logprobs.float()
        scores.index_fill_(1, forbidden, -INF)
        if block_trigrams:
            _block_repeated_trigrams(scores, seqs)
        vocab_size = scores.shape[1]
        top, flat = scores.view(batch, k * vocab_size).topk(2 * k, dim=1)  # at most K of these are <end>
        rows = flat.div(vocab_size, rounding_mode="floor") + first_row
        word = flat.remainder(vocab_size)
        is_end = word == end

        ended = is_end[:, :k] & top[:, :k].isfinite() & ~done.unsqueeze(1)
        candidates = torch.where(ended, _score(top[:, :k], t + 1, length_penalty), -INF)
        pool_score, pick = torch.cat([pool_score, candidates], dim=1).topk(num_captions, dim=1)
        new_ids = torch.arange(t * k, (t + 1) * k, device=device).expand(batch, k)
        pool_id = torch.cat([pool_id, new_ids], dim=1).gather(1, pick)
        step_logprobs.append(top[:, :k])
        step_sources.append(rows[:, :k])

        keep = is_end.long().argsort(dim=1, stable=True)[:, :k]  # the K best that do not end, in order
        live = top.gather(1, keep)
        parents = rows.gather(1, keep).view(-1)
        words = word.gather(1, keep).view(-1)
        step_words.append(words)
        step_parents.append(parents)
        step_alphas.append(alpha)
        if block_trigrams:
            seqs = torch.cat([seqs.index_select(0, parents), words.unsqueeze(1)], dim=1)
        shared = {name for name in shared if new_state.get(name) is state[name]}
        state = {name: v if name in shared else v.index_select(0, parents) for name, v in new_state.items()}

        # logprobs only fall, so a live hypothesis can at best keep its logprob, at the length that
        # divides it most: max_length when length_penalty > 0, its next length when < 0
        reachable_length = max_length if length_penalty > 0 else t + 2
        best_reachable = _score(live.max(dim=1).values, reachable_length, length_penalty)
        done |= pool_score[:, -1] >= best_reachable
        if bool(done.all()):
            break

    return _collect(pool_score, pool_id, live, k, length_penalty, step_words, step_parents, step_alphas,
                    step_logprobs, step_sources)


def _collect(pool_score: Tensor, pool_id: Tensor, live: Tensor, k: int, length_penalty: float,
             step_words: list[Tensor], step_parents: list[Tensor], step_alphas: list[Tensor],
             step_logprobs: list[Tensor], step_sources: list[Tensor]) -> list[list[Caption]]:
    """Package beam search results on the CPU, following backpointers to recover words and alphas."""
    words = torch.stack(step_words).tolist()  # [step][row]
    parents = torch.stack(step_parents).tolist()
    alphas = torch.stack(step_alphas).float().cpu()  # (steps, rows, L), by parent row
    end_logprobs = torch.stack(step_logprobs).cpu()  # (steps, B, K)
    sources = torch.stack(step_sources).cpu()
    steps = len(words)

    def caption(length: int, row: int, logprob: float, score: float, finished: bool) -> Caption:
        """The hypothesis whose last word is the one chosen for `row` at step length - 1."""
        tokens, at_step, at_row = [], [], []
        for s in range(length - 1, -1, -1):
            tokens.append(words[s][row])
            row = parents[s][row]
            at_step.append(s)
            at_row.append(row)
        return Caption(tokens[::-1], logprob, score, finished, alphas[at_step[::-1], at_row[::-1]])

    results = []
    for b, (scores, ids) in enumerate(zip(pool_score.tolist(), pool_id.tolist())):
        captions = []
        for score, i in zip(scores, ids):
            if score > -INF:
                t, c = divmod(i, k)
                captions.append(caption(t, int(sources[t, b, c]), float(end_logprobs[t, b, c]), score, True))
        for j, logprob in enumerate(live[b].tolist()):  # only when the search ran to max_length
            if len(captions) < len(scores) and logprob > -INF:
                score = float(_score(torch.tensor(logprob), steps, length_penalty))
                captions.append(caption(steps, b * k + j, logprob, score, False))
        results.append(captions)
    return results
