"""Tokenizer and vocabulary.

Tokenization follows coco-caption's PTB tokenizer (lower case, clitics such as 's and n't split off,
punctuation dropped, hyphenated words kept whole) so that what the model learns to write is exactly
what the metrics compare against.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(len(SPECIALS))  # every vocabulary's first four ids
NEVER_WRITTEN = (PAD_ID, START_ID, UNK_ID)  # what decoding forbids by default

# A word (with inner hyphens, apostrophes or dots), a clitic standing alone ("dog 's"), or one symbol.
_TOKEN = re.compile(r"[a-z0-9]+(?:[-'.][a-z0-9]+)*|'(?:s|re|ve|ll|d|m)\b|\S")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
# Tokens coco-caption's tokenizer removes after PTB tokenization.
_PUNCTUATION = set("''  '  ``  `  -lrb-  -rrb-  -lcb-  -rcb-  .  ?  !  ,  :  -  --  ...  ;  \"  (  )  [  ]  {  }"
                   .split())


def tokenize(text: str) -> list[str]:
    """Lower-case words with PTB clitic splits; punctuation vanishes as in coco-caption, other symbols stay."""
    text = text.lower().replace("\u2019", "'").replace("`", "'")
    tokens: list[str] = []
    for tok in _TOKEN.findall(text):
        match = _CLITIC.match(tok)
        if match:
            tokens += match.groups()
        elif tok not in _PUNCTUATION:
            tokens.append(tok)
    return tokens


class Vocab:
    """Word <-> id mapping with the four special tokens first, so ids 0..3 mean the same everywhere."""

    def __init__(self, words: Sequence[str], min_count: int = 1, max_length: int = 50) -> None:
        self.itos: list[str] = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.min_count = min_count
        self.max_length = max_length

    pad, start, end, unk = PAD_ID, START_ID, END_ID, UNK_ID

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5, max_length: int = 50) -> Vocab:
        """Keep words seen at least `min_count` times; pass only training captions so dev/test never leak in."""
        counts = Counter(tok for caption in captions for tok in tokenize(caption))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(words, min_count=min_count, max_length=max_length)

    def encode(self, caption: str) -> list[int]:
        """`<start> w1 .. wn <end>` ids, cut to max_length words."""
        ids = [self.stoi.get(tok, self.unk) for tok in tokenize(caption)[: self.max_length]]
        return [self.start, *ids, self.end]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first <end>, without specials except <unk>."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end:
                break
            if i not in (self.pad, self.start):
                words.append(self.itos[i])
        return " ".join(words)

    def save(self, path: str | Path) -> None:
        data = {"min_count": self.min_count, "max_length": self.max_length, "itos": self.itos}
        Path(path).write_text(json.dumps(data, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        data = json.loads(Path(path).read_text())
        if data.get("itos", [])[:4] != list(SPECIALS):
            raise ValueError(f"{path}: not a captioner vocabulary (must start with {', '.join(SPECIALS)})")
        return cls(data["itos"][4:], min_count=data["min_count"], max_length=data["max_length"])
