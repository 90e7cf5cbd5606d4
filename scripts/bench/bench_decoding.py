"""Time greedy decoding and beam search per image on the CPU with a full-size attention decoder, and
how much of it the decoder itself takes (the rest is the search: top-k, bookkeeping, reordering).

Random weights and features: the decoder practically never emits <end>, so every search runs to
max_length, the worst case. CPU time (--clock cpu) is steadier than wall time on a busy machine.
With --decoder transformer (the configs/flickr8k-transformer.yaml shape) it also times the same
searches without the key/value cache (every step re-running the prefix), so the cache's speed-up is
measured in one run. Several decoders, comma-separated (a family, with `:H` for H attention heads),
are timed in the same run, one after the other:

    python scripts/bench/bench_decoding.py --decoder attention,attention:4,hard-attention

Usage: python scripts/bench/bench_decoding.py [--decoder FAMILY[:HEADS],...] [--threads 2] [--batch 32]
       [--clock wall|cpu] [--profile]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from captioner.decoder_args import TransformerArgs
from captioner.decoding import beam_search, greedy
from captioner.decoding_options import DecodingOptions
from captioner.models import CaptionDecoder, State, decoder_class


class TimedDecoder:
    """Wraps a decoder to add up the time spent in its init_state and step."""

    def __init__(self, decoder: CaptionDecoder, clock: Callable[[], float]) -> None:
        self.decoder, self.clock, self.spent = decoder, clock, 0.0

    def init_state(self, features: torch.Tensor) -> State:
        start = self.clock()
        state = self.decoder.init_state(features)
        self.spent += self.clock() - start
        return state

    def step(self, words: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        start = self.clock()
        out = self.decoder.step(words, state)
        self.spent += self.clock() - start
        return out


def time_searches(model: CaptionDecoder, decoder: TimedDecoder, features: torch.Tensor, args: argparse.Namespace,
                  clock: Callable[[], float], spec: str) -> dict[str, Callable[[], object]]:
    """Print ms/image of greedy, beam 3 and beam 5 (the transformer with and without its cache); return them."""
    searches: dict[str, Callable[[], object]] = {
        "greedy": lambda: greedy(decoder, features, args.max_length),
        "beam 3": lambda: beam_search(decoder, features, DecodingOptions(beam_size=3, max_length=args.max_length)),
        "beam 5": lambda: beam_search(decoder, features, DecodingOptions(beam_size=5, max_length=args.max_length)),
    }
    transformer = model.family == "transformer"
    for cache in [True, False] if transformer else [True]:
        model.kv_cache = cache
        label = "" if not transformer else " (key/value cache)" if cache else " (no cache)"
        for name, search in searches.items():
            search()  # warm-up
            runs = []
            for _ in range(args.repeats):
                decoder.spent, start = 0.0, clock()
                search()
                runs.append((clock() - start, decoder.spent))
            total, in_decoder = min(runs)
            print(f"{spec} {name}{label}: {1000 * total / args.batch:.2f} ms/image, of which the search itself "
                  f"{1000 * (total - in_decoder) / args.batch:.2f} ms ({100 * (1 - in_decoder / total):.0f}%)")
    return searches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder", default="attention", help="FAMILY[:HEADS],... (default: attention)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="report the fastest of this many runs")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table for beam 5")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    features = torch.randn(args.batch, 49, 1280)
    with torch.inference_mode():
        for spec in args.decoder.split(","):
            family, _, heads = spec.partition(":")
            torch.manual_seed(0)
            if family == "transformer":
                shape = TransformerArgs(model_dim=384, transformer_heads=6, transformer_layers=2, encoder_layers=1,
                                        ff_dim=1536)
            else:  # the LSTM families, at configs/flickr8k.yaml's width
                shape = decoder_class(family).Args(attention_heads=int(heads or 1))
            model: CaptionDecoder = decoder_class(family)(shape, 3000, 1280).eval()
            decoder = TimedDecoder(model, clock)
            searches = time_searches(model, decoder, features, args, clock, spec)
        if args.profile:  # the last decoder's
            with torch.profiler.profile() as prof:
                searches["beam 5"]()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
