"""Training objectives: what one batch's loss is. `step.train_step` runs whichever it is given
(autocast, objective, backward, clip, update) and never asks which.

An objective is a callable `(model, batch) -> StepResult`. Its logs are sums over the batch's
`n` units (tokens, samples), so an epoch's figures are totals divided by the total n.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cider import CiderD
from .config import Config
from .decoding import sample
from .encoders import Encoder
from .features import Prepared
from .metrics import repeated_bigrams
from .models import CaptionDecoder
from .reinforce import surrogate
from .vocab import END, Vocab, tokenize


@dataclass
class Batch:
    """Whole images with all their captions, as `batching.CaptionSet.batch` makes them."""

    inputs: Tensor  # (I, L, C) cached features or (I, 3, S, S) images of the batch's I images
    rows: np.ndarray  # (I,) their rows in the prepared folder
    owner: Tensor  # (B,) index into inputs of each caption's image
    captions: Tensor  # (B, T) `<start> w.. <end> <pad>..`, longest first
    lengths: Tensor  # (B,)
    teacher_forcing: float = 1.0  # scheduled sampling: the probability of feeding the true previous word
    # (I, M) each image's retrieved captions, for a retrieval decoder (models/retrieval.py)
    memory: Tensor | None = None


@dataclass
class StepResult:
    loss: Tensor  # what backward runs on
    logs: dict[str, Tensor]  # detached sums over the n units of the batch, e.g. {"loss": ..., "top5": ...}
    n: int


@dataclass
class CrossEntropy:
    """Teacher-forced cross-entropy of every next word (with optional label smoothing), plus the
    decoder family's own auxiliary loss. Logs the loss and top-5 accuracy per token."""

    label_smoothing: float = 0.0

    def __call__(self, model: nn.Module, batch: Batch) -> StepResult:
        return self.on(model, batch.inputs, batch)

    def on(self, model: nn.Module, inputs: Tensor, batch: Batch) -> StepResult:
        """The loss of `model` (a decoder, or train.EndToEnd) on inputs, the batch's captions."""
        memory = {"memory": batch.memory} if batch.memory is not None else {}
        out = model(inputs, batch.captions, batch.lengths, image_index=batch.owner,
                    teacher_forcing=batch.teacher_forcing, **memory)
        logits = out.logits.float()
        ce = F.cross_entropy(logits, out.targets, label_smoothing=self.label_smoothing)
        n = out.targets.numel()
        top5 = (logits.detach().topk(5, dim=1).indices == out.targets.unsqueeze(1)).any(dim=1).sum()
        return StepResult(ce + out.aux_loss.float(), {"loss": ce.detach() * n, "top5": top5}, n)


class CaptionReward:
    """CIDEr-D, plus bleu_weight x sentence BLEU-4 and less repeat_penalty per repeated bigram if asked,
    of sampled captions against all the references of their images. The document frequencies come from every image given
    (the train
    split), worked out once.

    CIDEr-D sees the end of a caption as a word (`<end>`, closing every reference and every sample
    that ended): without it, cutting a caption short costs only its length penalty, and training
    learned endings like "sitting in a brown" within 300 steps on Flickr8k (docs/RESULTS.md). With
    it, "a brown <end>" is an n-gram no reference has."""

    def __init__(self, references: dict[int, list[str]], vocab: Vocab, bleu_weight: float = 0.0,
                 repeat_penalty: float = 0.0) -> None:
        words = {row: [tokenize(c) for c in captions] for row, captions in references.items()}
        self.cider = CiderD({row: [w + [END] for w in ws] for row, ws in words.items()})
        self.vocab, self.bleu_weight, self.repeat_penalty = vocab, bleu_weight, repeat_penalty
        self.references = {row: [" ".join(w) for w in ws] for row, ws in words.items()} if bleu_weight else {}

    def __call__(self, rows: np.ndarray, tokens: Tensor) -> np.ndarray:
        """rows (N,) prepared rows of the images, tokens (N, T) as `decoding.sample` gives them -> (N,)."""
        ids = tokens.tolist()
        candidates = [self.vocab.decode(t).split() for t in ids]
        ended = [w + [END] if self.vocab.end in t else w for w, t in zip(candidates, ids)]
        reward = self.cider.score(rows.tolist(), ended)
        if self.bleu_weight:
            reward = reward + self.bleu_weight * self.bleu4(rows, candidates)
        if self.repeat_penalty:
            reward = reward - self.repeat_penalty * np.array([repeated_bigrams(w) for w in candidates])
        return reward

    def bleu4(self, rows: np.ndarray, candidates: list[list[str]]) -> np.ndarray:
        """pycocoevalcap's per-caption BLEU-4 (its smoothed counts, closest reference length)."""
        from pycocoevalcap.bleu.bleu_scorer import BleuScorer

        scorer = BleuScorer(n=4)
        for row, words in zip(rows.tolist(), candidates):
            scorer += (" ".join(words), self.references[row])
        with contextlib.redirect_stdout(io.StringIO()):
            _, per_caption = scorer.compute_score(option="closest", verbose=0)
        return np.array(per_caption[3])


def advantages(rewards: Tensor, baseline: Tensor | None = None) -> Tensor:
    """rewards (I, k) of k samples per image, less a baseline: the greedy caption's reward (I,) when
    given, else the mean reward of the image's other k - 1 samples, so that a sample is judged only
    against its rivals and the advantages of an image sum to zero."""
    if baseline is not None:
        return rewards - baseline.unsqueeze(1)
    k = rewards.shape[1]
    return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)


@dataclass
class SelfCritical:
    """Self-critical sequence training (Rennie et al., 2017): sample k captions per image with
    gradients, reward each with CIDEr-D against its image's references, and raise the log-probability
    of those that beat the baseline, lower the others': loss = -(reward - baseline) x (sum of the
    caption's log-probabilities), averaged over the samples. Logs the loss and the mean reward of the
    samples (and of the greedy captions with the greedy baseline) per sample.

    With xe_weight the teacher-forced cross-entropy of the batch's human captions is added: on
    Flickr8k's 6,000 images the policy gradient alone drifts into broken phrases ("playing on a in the
    water") within an epoch (docs/RESULTS.md), and the human captions hold the language in place."""

    reward: Callable[[np.ndarray, Tensor], np.ndarray]  # (rows (N,), tokens (N, T)) -> rewards (N,)
    samples: int = 5
    baseline: str = "mean"  # mean | greedy
    max_length: int = 16
    xe_weight: float = 0.0

    def __call__(self, model: nn.Module, batch: Batch) -> StepResult:
        decoder, features = self._decoder_and_features(model, batch.inputs)
        k, images = self.samples, len(batch.rows)
        # a retrieval decoder samples reading each image's retrieved captions (models/retrieval.py)
        sampler = cast(Any, decoder).reading(batch.memory) if batch.memory is not None else decoder
        tokens, logprobs, _ = sample(sampler, features, k, self.max_length)
        rewards = torch.from_numpy(self.reward(np.repeat(batch.rows, k), tokens)).float().view(images, k)
        logs: dict[str, Tensor] = {"reward": rewards.sum()}
        greedy_reward = None
        if self.baseline == "greedy":
            was_training = decoder.training
            decoder.eval()
            with torch.no_grad():
                greedy_tokens, _, _ = sample(sampler, features, 1, self.max_length, greedy=True)
            decoder.train(was_training)
            greedy_reward = torch.from_numpy(self.reward(np.asarray(batch.rows), greedy_tokens)).float()
            logs["greedy_reward"] = greedy_reward.sum() * k  # per sample, like the others
        advantage = advantages(rewards, greedy_reward).view(-1).to(logprobs.device)
        loss = surrogate(logprobs.sum(dim=1), advantage).mean()
        n = images * k
        if self.xe_weight:
            xe = CrossEntropy().on(decoder, features, batch)
            loss = loss + self.xe_weight * xe.loss
            logs["xe"] = xe.logs["loss"] / xe.n * n  # per token, logged per sample like the others
        return StepResult(loss, {"loss": loss.detach() * n, **logs}, n)

    @staticmethod
    def _decoder_and_features(model: nn.Module, inputs: Tensor) -> tuple[CaptionDecoder, Tensor]:
        """Sampling calls the decoder's init_state and step, not its forward: DistributedDataParallel
        would not sync those gradients, so it is refused; in stage 2 the model is train.EndToEnd and
        the images go through its encoder first."""
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("objective scst runs in one process only (not under torchrun)")
        if hasattr(model, "encoder"):  # train.EndToEnd (not imported here: train imports this module)
            return cast(CaptionDecoder, model.decoder), cast(Encoder, model.encoder).regions(inputs)
        return cast(CaptionDecoder, model), inputs


def make_objective(cfg: Config, prepared: Prepared) -> CrossEntropy | SelfCritical:
    """The objective `cfg.objective` names; self-critical training's rewards use the train split's
    references of `prepared`."""
    if cfg.objective == "xe":
        return CrossEntropy(cfg.label_smoothing)
    if cfg.objective == "scst":  # its options were checked with the Config
        references = {row: list(prepared.records[row].captions) for row in prepared.indices("train")}
        reward = CaptionReward(references, prepared.vocab, cfg.scst_bleu_weight, cfg.scst_repeat_penalty)
        return SelfCritical(reward, cfg.scst_samples, cfg.scst_baseline, cfg.scst_max_length, cfg.scst_xe_weight)
    raise ValueError(f"objective must be xe or scst, not {cfg.objective!r}")
