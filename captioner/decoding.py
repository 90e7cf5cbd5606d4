"""Turning a decoder's next-word distributions into captions: greedy decoding and beam search, and
sampling with gradients for self-critical training.

Both search a whole batch of images at once. Beam search flattens images and beams into B*K rows, so
each step is a single `decoder.step` call however many images and beams there are, and the bookkeeping
is a handful of small tensor operations: finished captions are kept as (score, step, candidate) entries
and the words and attention weights are rebuilt from per-step backpointers once the search is over.

Only the `Decoder` protocol below is used. Its state is a dict of tensors with the batch on dim 0, so
following the beams means `index_select` on every tensor. `step` must return new tensors for what it
changes instead of writing into the old ones: a tensor that it hands back as the very same object is
taken as unchanged. Beam search relies on that to copy the state from one row per image to K only
once, after the first step, and never to reorder the tensors that stay the same for all of an image's
beams (for the attention decoder: the feature map and its projection, most of the state).

Scores: a caption's `logprob` is the sum of the decoder's log-probabilities of its words (and of <end>
when it finished); forbidden words are removed without renormalising. Its `score`, which ranks beam
search results, is logprob / length**length_penalty where length counts the words and <end>: 0 ranks by
total log-probability, which favours short captions because every word costs probability; 1 ranks by
mean log-probability per word; values in between trade the two off.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar, cast

import numpy as np
import torch
from torch import Tensor, nn

from .concepts import contradicts, unseen
from .consensus import VOTERS, rerank
from .decoding_options import DecodingOptions
from .models.base import Decoder, State
from .reinforce import draw
from .vocab import END_ID, NEVER_WRITTEN, START_ID, Vocab, tokenize

if TYPE_CHECKING:
    from .datastore import Datastore

INF = float("inf")
Number = TypeVar("Number", Tensor, float)


class Ensemble(nn.Module):
    """Several decoders over the same features, decoded as one: each word's distribution is the mean of
    the members' probabilities, so greedy decoding and beam search take it like any decoder. Members
    must share the vocabulary. Each member's state tensors keep their identity under a prefixed name,
    so beam search still leaves the unchanging ones alone. The attention shown is the members' mean."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 decoders, got {len(members)}")
        self.members = nn.ModuleList(members)

    def decoders(self) -> list[Decoder]:
        """The members with their type: iterating an nn.ModuleList gives plain Modules."""
        return cast("list[Decoder]", list(self.members))

    def init_state(self, features: Tensor) -> State:
        return {f"{i}.{name}": v for i, m in enumerate(self.decoders()) for name, v in m.init_state(features).items()}

    def step(self, words: Tensor, state: State) -> tuple[Tensor, State, Tensor]:
        logprobs, alphas, new = [], [], {}
        for i, member in enumerate(self.decoders()):
            prefix = f"{i}."
            own = {name[len(prefix):]: v for name, v in state.items() if name.startswith(prefix)}
            lp, own, alpha = member.step(words, own)
            logprobs.append(lp.float())
            alphas.append(alpha.float())
            new.update({prefix + name: v for name, v in own.items()})
        mean = torch.logsumexp(torch.stack(logprobs), dim=0) - math.log(len(logprobs))
        shown = [a for a in alphas if a.shape[1]] or alphas[:1]  # a member without attention has none to show
        return mean, new, torch.stack(shown).mean(dim=0)


@dataclass
class Caption:
    """One decoded caption, with what a user interface or an evaluation needs to show or rank it."""

    tokens: list[int]  # word ids, without <start> and <end>
    logprob: float  # total log-probability of the tokens, and of <end> when finished
    score: float  # the ranking score: logprob / length**length_penalty
    finished: bool  # ended with <end> within max_length words
    alphas: Tensor  # (len(tokens), L) float32 CPU attention weights of each word; L is 0 without attention
    text: str = ""  # a caption of a similar photo that consensus.py chose, its words (tokens empty); "" otherwise
    agreement: float | None = None  # its consensus score, where consensus.py ranked the captions


@torch.no_grad()
def greedy(decoder: Decoder, features: Tensor, max_length: int = 20, end: int = END_ID, start: int = START_ID,
           forbid: Sequence[int] = NEVER_WRITTEN) -> list[Caption]:
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


def sample(decoder: Decoder, features: Tensor, k: int = 1, max_length: int = 20, temperature: float = 1.0,
           greedy: bool = False, start: int = START_ID, end: int = END_ID, forbid: Sequence[int] = NEVER_WRITTEN
           ) -> tuple[Tensor, Tensor, Tensor]:
    """k captions per image of features (B, L, C), sampled word by word, for self-critical training.

    Runs with gradients unless the caller turns them off: logprobs are the decoder's own log-probabilities
    of the chosen words, so their sum over a caption is what the policy gradient pushes. Words are drawn
    from softmax(logprobs / temperature) over the allowed words (`forbid` as in `greedy`); greedy=True
    takes the most probable one instead. Rows are image-major (row b * k + j is image b's j-th sample),
    and the state is repeated k times up front, so each step is one `decoder.step` over B * k rows.
    Returns tokens (B*k, T) with <end> included and <pad> after it, logprobs (B*k, T) zero after <end>,
    and lengths (B*k,) counting <end> (max_length when the caption did not end); T <= max_length is the
    longest caption.
    """
    if k < 1 or max_length < 1:
        raise ValueError(f"k and max_length must be at least 1, not {k} and {max_length}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, not {temperature}")
    rows, device = features.shape[0] * k, features.device
    forbidden = torch.tensor(forbid, dtype=torch.long, device=device)
    state = decoder.init_state(features)
    if k > 1:
        state = {name: v.repeat_interleave(k, dim=0) for name, v in state.items()}
    words = torch.full((rows,), start, dtype=torch.long, device=device)
    lengths = torch.full((rows,), max_length, dtype=torch.long, device=device)
    running = torch.ones(rows, dtype=torch.bool, device=device)
    chosen, chosen_logprobs = [], []
    for t in range(max_length):
        logprobs, state, _ = decoder.step(words, state)
        logprobs = logprobs.float()
        allowed = logprobs.detach().index_fill(1, forbidden, -INF)
        if greedy:
            words = allowed.argmax(dim=1)
        else:
            words = draw(torch.softmax(allowed / temperature, dim=1))
        word_logprob = logprobs.gather(1, words.unsqueeze(1)).squeeze(1)
        chosen.append(torch.where(running, words, 0))  # <pad> (id 0) after the end
        chosen_logprobs.append(torch.where(running, word_logprob, 0.0))
        ended = running & (words == end)
        lengths = torch.where(ended, t + 1, lengths)
        running = running & ~ended
        if not bool(running.any()):
            break
    return torch.stack(chosen, dim=1), torch.stack(chosen_logprobs, dim=1), lengths


def _score(logprob: Number, length: int, length_penalty: float) -> Number:
    """The ranking score of a caption of `length` words counting <end> (see the module docstring)."""
    return logprob / float(length) ** length_penalty


def _block_repeated_trigrams(scores: Tensor, seqs: Tensor) -> None:
    """Set to -inf, in place, the score of each word that would complete a trigram its row of seqs
    (hypotheses, words so far) already contains, so that captions cannot loop on a phrase."""
    n = seqs.shape[1]
    if n < 3:
        return
    # trigram i is (seqs[i], seqs[i+1], seqs[i+2]): its third word repeats it if its first two end seqs
    same_start = (seqs[:, : n - 2] == seqs[:, n - 2 : n - 1]) & (seqs[:, 1 : n - 1] == seqs[:, n - 1 :])
    scores.scatter_reduce_(1, seqs[:, 2:], torch.where(same_start, -INF, INF), reduce="amin")


@dataclass
class _Backpointers:
    """Per step of beam search, what spelling out any hypothesis at the end needs: storing a few small
    tensors per step is cheaper than carrying every hypothesis' words and alphas along and reordering them."""

    words: list[Tensor] = field(default_factory=list)  # (rows,) the word that each live row just got,
    parents: list[Tensor] = field(default_factory=list)  # (rows,) the previous step's row it extends
    alphas: list[Tensor] = field(default_factory=list)  # (rows, L) and the attention behind the word
    end_logprobs: list[Tensor] = field(default_factory=list)  # (B, <=K) logprob of the first candidates,
    end_parents: list[Tensor] = field(default_factory=list)  # and their rows: finished captions' origin

    def captions(self, pool_score: Tensor, pool_id: Tensor, live: Tensor, k: int,
                 length_penalty: float) -> list[list[Caption]]:
        """Each image's finished captions in the pool, then, to fill it up, its best live hypotheses."""
        # lists per step: the number of rows can change over the first steps
        words = [w.tolist() for w in self.words]  # [step][row]
        parents = [p.tolist() for p in self.parents]
        first_row = [0, *itertools.accumulate(len(w) for w in words)]  # of each step in all_alphas
        all_alphas = torch.cat(self.alphas).float().cpu()
        end_logprobs = [x.tolist() for x in self.end_logprobs]  # [step][image][candidate]
        end_parents = [x.tolist() for x in self.end_parents]
        steps, width = len(words), live.shape[1]

        def caption(length: int, row: int, logprob: float, score: float, finished: bool) -> Caption:
            """The hypothesis of `length` words whose last word went to `row` at step length - 1."""
            tokens, alpha_rows = [], []
            for s in range(length - 1, -1, -1):
                tokens.append(words[s][row])
                alpha_rows.append(first_row[s] + row)
                row = parents[s][row]
            return Caption(tokens[::-1], logprob, score, finished, all_alphas[alpha_rows[::-1]])

        results = []
        pools = zip(pool_score.tolist(), pool_id.tolist(), live.tolist())
        for b, (scores, ids, live_logprobs) in enumerate(pools):
            found = []
            for score, i in zip(scores, ids):
                if score > -INF:
                    t, c = divmod(i, k)
                    found.append(caption(t, end_parents[t][b][c], end_logprobs[t][b][c], score, True))
            # the search ran to max_length if the pool is short, so live hypotheses have `steps` words
            unfinished = [(j, lp) for j, lp in enumerate(live_logprobs) if lp > -INF]
            for j, logprob in unfinished[: len(scores) - len(found)]:
                score = _score(logprob, steps, length_penalty)
                found.append(caption(steps, b * width + j, logprob, score, False))
            results.append(found)
        return results


@torch.no_grad()
def beam_search(decoder: Decoder, features: Tensor, options: DecodingOptions = DecodingOptions(),
                forbid: Sequence[int] = NEVER_WRITTEN) -> list[list[Caption]]:
    """The num_captions best captions of at most max_length words for each image in features (B, L, C),
    best first, with the other `options` as below.

    Each step extends the K = beam_size live hypotheses of an image by every allowed word and keeps the
    K best extensions. An <end> among those K finishes a caption (so beam_size=1 is greedy decoding),
    and the next best extensions that do not end take its place, so K hypotheses stay live. An image is
    done when its num_captions-th finished caption scores at least as well as any live hypothesis
    could still score; a done image's rows leave the decoder's batch (most images finish well before the
    slowest of their batch), and the search stops when every image is done or after max_length words. Finished
    captions come first; if an image has fewer than num_captions, its best unfinished ones (cut at
    max_length words, finished=False) fill the list. With length_penalty > 0 a longer caption may
    still win, so the search usually runs to max_length and beam_size=1 may outdo greedy.
    block_trigrams forbids a word that would repeat a trigram of the hypothesis. `forbid` is as in
    `greedy`.
    """
    beam_size, max_length, num_captions = options.beam_size, options.max_length, options.num_captions
    length_penalty, block_trigrams, start, end = options.length_penalty, options.block_trigrams, START_ID, END_ID
    if not 1 <= num_captions <= beam_size:
        raise ValueError(f"num_captions must be between 1 and beam_size ({beam_size}), not {num_captions}")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, not {max_length}")
    batch, k, device = features.shape[0], beam_size, features.device
    forbidden = torch.tensor(forbid, dtype=torch.long, device=device)
    # One row per image until the first step has chosen K words: the K beams would start identical.
    state = decoder.init_state(features)
    shared: set[str] = set()  # names of the tensors in state that are identical across an image's rows
    words = torch.full((batch,), start, dtype=torch.long, device=device)
    live = torch.zeros((batch, 1), device=device)  # (B, beams) log-probability of each live hypothesis
    image = torch.arange(batch, device=device).unsqueeze(1)
    pool_score = torch.full((batch, num_captions), -INF, device=device)  # finished captions, best first,
    pool_id = torch.zeros((batch, num_captions), dtype=torch.long, device=device)  # as step * K + candidate
    seqs = words.new_empty(batch, 0)  # the live hypotheses' words, kept only for trigram blocking
    trace = _Backpointers()
    active = image.squeeze(1)  # the images still searched: a done image's rows leave the decoder's batch
    for t in range(max_length):
        width = live.shape[1]
        if len(active) == batch:
            logprobs, new_state, alpha = decoder.step(words, state)
        else:  # only the active images' rows run; a done image's rows score -inf, so its pool stays as it is
            active_rows = (active.unsqueeze(1) * width + torch.arange(width, device=device)).view(-1)
            found, new_state, found_alpha = decoder.step(words.index_select(0, active_rows), state)
            logprobs = found.new_full((batch * width, found.shape[1]), -INF).index_copy_(0, active_rows, found)
            alpha = found_alpha.new_zeros((batch * width, *found_alpha.shape[1:])).index_copy_(
                0, active_rows, found_alpha)
        scores = live.view(-1, 1) + logprobs.float()
        scores.index_fill_(1, forbidden, -INF)
        if block_trigrams:
            _block_repeated_trigrams(scores, seqs)
        vocab_size = scores.shape[1]
        # at most `width` <= K candidates end, so the first 2K hold the K best that do not
        top, flat = scores.view(batch, width * vocab_size).topk(min(2 * k, width * vocab_size), dim=1)
        rows = flat.div(vocab_size, rounding_mode="floor") + image * width
        word = flat.remainder(vocab_size)
        is_end = word == end

        ended = is_end[:, :k] & top[:, :k].isfinite()
        candidates = torch.where(ended, _score(top[:, :k], t + 1, length_penalty), -INF)
        pool_score, pick = torch.cat([pool_score, candidates], dim=1).topk(num_captions, dim=1)
        new_ids = torch.arange(t * k, t * k + candidates.shape[1], device=device).expand_as(candidates)
        pool_id = torch.cat([pool_id, new_ids], dim=1).gather(1, pick)
        trace.end_logprobs.append(top[:, :k])
        trace.end_parents.append(rows[:, :k])

        keep = is_end.long().argsort(dim=1, stable=True)[:, :k]  # the K best that do not end, in order
        live = top.gather(1, keep).masked_fill(is_end.gather(1, keep), -INF)  # ends only when words ran out
        parents = rows.gather(1, keep).view(-1)
        words = word.gather(1, keep).view(-1)
        trace.words.append(words)
        trace.parents.append(parents)
        trace.alphas.append(alpha.index_select(0, parents))
        if block_trigrams:
            seqs = torch.cat([seqs.index_select(0, parents), words.unsqueeze(1)], dim=1)

        # Logprobs only fall, so a live hypothesis can at best keep its logprob, at the length that
        # divides it most: max_length when length_penalty > 0, its next length when < 0. Once this
        # bound is beaten it stays beaten, so an image whose pool is good enough is done for good.
        reachable_length = max_length if length_penalty > 0 else t + 2
        best_reachable = _score(live.max(dim=1).values, reachable_length, length_penalty)
        done = pool_score[:, -1] >= best_reachable
        if bool(done.all()):
            break
        # The decoder's state holds the active images' rows only: each kept image's new rows, as rows of
        # that state (its place among the active images x width + the parent's beam).
        staying = ~done.index_select(0, active)
        place = torch.nonzero(staying).squeeze(1)
        active = active.index_select(0, place)
        state_rows = (place.unsqueeze(1) * width + parents.view(batch, -1).index_select(0, active) % width).view(-1)
        # A tensor the same across an image's rows stays so when reordered: only a new number of rows
        # (1 to K per image after the first step, or fewer images) makes copies necessary.
        if width == 1:
            shared = set(new_state)
        else:
            shared = {name for name in shared if new_state.get(name) is state[name]}
        resized = keep.shape[1] != width or len(place) != len(staying)
        state = {name: v if name in shared and not resized else v.index_select(0, state_rows)
                 for name, v in new_state.items()}
    return trace.captions(pool_score, pool_id, live, k, length_penalty)


def by_consensus(captions: Sequence[Caption], words: Vocab, voters: Sequence[str], idf: np.ndarray,
                 options: DecodingOptions) -> list[Caption]:
    """The num_captions best of a photo's decoded `captions` (in `words`) and the captions of similar photos
    that vote (consensus.py), decoder_lean given to the decoder's; a voter chosen becomes a Caption holding
    its words in `text`."""
    texts = [words.decode(c.tokens) for c in captions]
    out = []
    for i, agreement in rerank(texts, voters, idf, options.decoder_lean)[:options.num_captions]:
        if i < len(captions):
            out.append(dataclasses.replace(captions[i], agreement=agreement))
        else:
            text = " ".join(tokenize(voters[i - len(captions)]))
            out.append(Caption([], 0.0, 0.0, True, torch.zeros(0, 0), text=text, agreement=agreement))
    return out


def voters_needed(options: DecodingOptions, familiarity_check: bool = False) -> int:
    """How many retrieved captions `chosen` may need per photo beyond those the decoder reads; with
    `familiarity_check`, the model has one (familiarity.py), and its unfamiliar photos are voted on."""
    voting = options.consensus or (familiarity_check and options.unfamiliar_threshold < 1.0)
    return VOTERS if voting or (options.concept_check and options.concepts) else 0


def search_options(options: DecodingOptions, voting: bool = False) -> DecodingOptions:
    """What beam search runs under for `chosen`: with consensus, or where some photo is `voting` (an unfamiliar
    one), every beam is a candidate."""
    return dataclasses.replace(options, num_captions=options.beam_size) if options.consensus or voting else options


def chosen(captions: Sequence[Caption], words: Vocab, voters: Sequence[str], store: Datastore,
           probs: np.ndarray | None, options: DecodingOptions, unfamiliar: bool = False) -> list[Caption]:
    """A photo's captions as returned, from its beam search's `captions` (in `words`, searched under
    search_options) and the captions of similar photos in `store` that vote. A photo unlike the model's training
    photos (`unfamiliar`, familiarity.py) is decided as with consensus, with no lead for the decoder's captions
    (they were learned elsewhere); with consensus on, every photo already is, at decoder_lean. Where the best
    caption contradicts the ImageNet head's concept probabilities `probs` (the concept check,
    concepts.contradicts), every caption naming what the head does not see is left out. With consensus, the vote
    is among the rest and the voters (by_consensus); without, where the best caption was left out the vote is
    among the voters alone, since the decoder's other beams mostly name the same wrong thing; elsewhere the
    captions stand."""
    if unfamiliar and voters and not options.consensus:
        options = dataclasses.replace(options, consensus=True, decoder_lean=0.0)
    if not (options.concept_check and options.concepts and probs is not None and voters and captions
            and contradicts(words.decode(captions[0].tokens), probs, options.concept_threshold)):
        if options.consensus:
            return by_consensus(captions, words, voters, store.idf, options)
        return list(captions[:options.num_captions])
    if options.consensus:
        kept = [c for c in captions if not unseen(words.decode(c.tokens), probs)]
        return by_consensus(kept, words, voters, store.idf, options)
    return by_consensus([], words, voters, store.idf, options)
