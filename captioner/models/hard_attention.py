"""Show, Attend and Tell's stochastic "hard" attention (Xu et al., 2015, section 4.1), on the soft
attention LSTM's code: only where the context comes from and what training adds differ.

At each word the decoder looks at one region s drawn from the attention distribution alpha instead of
alpha's weighted mean. Training climbs the lower bound sum_s p(s) log p(y|s) <= log p(y):
- the decoder's weights get the gradient of log p(y|s) at the drawn s: the teacher-forced
  cross-entropy, which the objective computes from DecoderOutput.logits as for any family;
- the attention gets REINFORCE, (log p(y|s) - b) x grad log p(s) with b a moving average of
  log p(y|s) (a buffer, so it is saved and resumed with the weights), plus entropy_weight x the
  gradient of the distributions' entropy, which keeps them from collapsing early;
- each image's captions use the expectation (soft attention's weighted mean) instead of a draw with
  probability expectation_probability, 0.5 in the paper, which lowers the estimator's variance.
Both extra terms enter DecoderOutput.aux_loss, so training has no family-specific branch.

Decoding is deterministic, so beam search, the ONNX export and a caption asked for twice agree.
hard_decode "expectation" (the default) feeds the weighted mean, a context training already feeds half
the images; "argmax" feeds the one most likely region, the reading closest to a drawn one, and the
attention picture is then its one-hot: one region per word.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from ..decoder_args import HardAttentionArgs
from ..reinforce import draw, surrogate
from .base import DecoderOutput, State, register_decoder
from .lstm import AttentionLSTM

BASELINE_DECAY = 0.9  # the paper's moving average: b <- 0.9 b + 0.1 log p(y|s)


@register_decoder("hard-attention")
class HardAttentionLSTM(AttentionLSTM):
    """The attention LSTM with a drawn region per word in training and a deterministic one in decoding.
    With attention_heads > 1 every head draws its own region."""

    Args = HardAttentionArgs
    title = "Show, Attend and Tell (hard attention)"

    baseline_sum: Tensor  # buffers: the moving-average baseline
    baseline_weight: Tensor

    def __init__(self, args: HardAttentionArgs, vocab_size: int, feature_dim: int,
                 words: list[str] | None = None) -> None:
        super().__init__(args, vocab_size, feature_dim, words)
        # b as a bias-corrected moving average (sum / weight), so early batches are not judged against 0
        self.register_buffer("baseline_sum", torch.zeros(()))
        self.register_buffer("baseline_weight", torch.zeros(()))
        # during a training pass: each image caption's choice of expectation, and per step what _attend
        # drew: (log p(s) per caption, zero where expected; the distributions' entropy per caption)
        self._expect: Tensor | None = None
        self._draws: list[tuple[Tensor, Tensor]] | None = None

    def _attend(self, state: State, h: Tensor) -> tuple[Tensor, Tensor]:
        alpha = self._distributions(state, h)  # (B, H, L)
        if self._draws is None:  # decoding, or a pass in eval mode
            if self.args.hard_decode == "argmax":
                alpha = F.one_hot(alpha.argmax(dim=-1), alpha.shape[-1]).to(alpha.dtype)
            return self._glimpse(state, alpha, h), alpha.mean(dim=1)
        n, _, regions = alpha.shape
        log_alpha = alpha.clamp_min(torch.finfo(alpha.dtype).tiny).log()
        chosen = draw(alpha.detach().flatten(0, 1)).view(n, -1)  # (B, H)
        assert self._expect is not None  # set with _draws by the training pass
        expect = self._expect[:n]
        weights = torch.where(expect[:, None, None], alpha, F.one_hot(chosen, regions).to(alpha.dtype))
        log_p = log_alpha.gather(2, chosen.unsqueeze(2)).sum(dim=(1, 2))
        self._draws.append((log_p.masked_fill(expect, 0.0), -(alpha * log_alpha).sum(dim=(1, 2))))
        return self._glimpse(state, weights, h), alpha.mean(dim=1)

    def forward(self, features: Tensor, captions: Tensor, lengths: Tensor, image_index: Tensor | None = None,
                teacher_forcing: float = 1.0, **inputs: Tensor | None) -> DecoderOutput:
        """The soft LSTM's teacher-forced pass; in training with drawn regions, and aux_loss adds the
        attention's REINFORCE and entropy terms to the doubly stochastic penalty. Both are divided by
        the number of predicted words, as the objective's mean cross-entropy is, so the two halves of
        the paper's gradient keep their proportion."""
        if not self.training:
            return super().forward(features, captions, lengths, image_index, teacher_forcing, **inputs)
        expect = torch.rand(features.shape[0], device=features.device) < self.args.expectation_probability
        expect = expect if image_index is None else expect[image_index]
        self._expect, self._draws = expect, []
        try:
            out = super().forward(features, captions, lengths, image_index, teacher_forcing, **inputs)
            draws = self._draws
        finally:
            self._expect = self._draws = None
        log_p_regions = per_caption([log_p for log_p, _ in draws])
        entropy = torch.cat([e for _, e in draws]).sum()
        log_p_words = -F.cross_entropy(out.logits.detach().float(), out.targets, reduction="none")
        reward = per_caption(log_p_words.split([len(log_p) for log_p, _ in draws]))  # log p(y|s)
        sampled = ~expect
        advantage = (reward - self._baseline(reward[sampled])) * sampled
        words = len(out.targets)
        reinforce = (surrogate(log_p_regions, advantage).sum() - self.args.entropy_weight * entropy) / words
        return DecoderOutput(out.logits, out.targets, out.aux_loss + reinforce)

    @torch.no_grad()
    def _baseline(self, rewards: Tensor) -> Tensor:
        """b before this batch (this batch's mean for the first one), then moved towards this batch's
        mean: b never depends on the draws it judges, except on the first batch."""
        if len(rewards) == 0:
            return rewards.new_zeros(())
        mean = rewards.mean()
        b = torch.where(self.baseline_weight > 0, self.baseline_sum / self.baseline_weight.clamp_min(1e-8), mean)
        self.baseline_sum.mul_(BASELINE_DECAY).add_((1 - BASELINE_DECAY) * mean)
        self.baseline_weight.mul_(BASELINE_DECAY).add_(1 - BASELINE_DECAY)
        return b


def per_caption(steps: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Sums per caption of step-major values, as the teacher-forced pass makes them: step t holds one
    value for each of the first n_t captions (n_0 = all of them)."""
    return pad_sequence(list(steps)).sum(dim=1)  # (captions, steps), zero-padded
