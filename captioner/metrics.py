"""BLEU, METEOR, ROUGE-L and CIDEr computed by pycocoevalcap, the way coco-caption does it, and
fluency statistics that those scores miss.

Papers report these exact implementations (Java PTB tokenization, METEOR 1.5, corpus-level CIDEr idf),
so numbers from here compare with published ones; re-implementing any of them would not.
pycocoevalcap comes with the `train` extra, so it is imported only when something is scored.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
_HEADERS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
# Words a finished English caption does not end with: a caption that does was cut off or went wrong.
FUNCTION_WORDS = frozenset("a an the of in on with and at to".split())
# METEOR's jar parses its own numbers with the JVM's default locale; a German or French one breaks it.
_JAVA_LOCALE = "-Duser.language=en -Duser.country=US"


def require_java(who: str = "coco-caption's scorers") -> None:
    """Fail before the work, not after it: coco-caption runs its tokenizer and METEOR in a JVM.

    A FileNotFoundError, so `captioner` prints it as one line and exits 2 like any missing file.
    """
    if shutil.which("java") is None:
        raise FileNotFoundError(f"java: not found; {who} need Java: "
                                "install it (e.g. `apt-get install default-jre-headless`)")


def score_captions(
    predictions: dict[str, str], references: dict[str, list[str]], metrics: Sequence[str] = METRICS
) -> dict[str, float]:
    """Corpus scores of one caption per image against its references, raw as pycocoevalcap returns them.

    Only the scorers behind `metrics` run: METEOR starts a JVM that loads a paraphrase table (~15 s), so
    per-epoch validation asks for ("Bleu_4", "CIDEr") and skips it. References of images without a
    prediction are ignored; CIDEr's idf comes from the references of the scored images only.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {METRICS}")
    if not predictions:
        raise ValueError("no predictions to score")
    for image_id in predictions:
        if not references.get(image_id):
            raise ValueError(f"prediction for {image_id!r} has no references")
    require_java("coco-caption's PTB tokenizer and METEOR")
    gts = _ptb_tokenize({i: references[i] for i in predictions})
    res = _ptb_tokenize({i: [caption] for i, caption in predictions.items()})
    scores = _run_scorers(gts, res, set(metrics))
    return {m: scores[m] for m in metrics}


def _run_scorers(gts: dict[str, list[str]], res: dict[str, list[str]], wanted: set[str]) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores: dict[str, float] = {}
    if any(m.startswith("Bleu") for m in wanted):
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram counts
            bleu, _ = Bleu(4).compute_score(gts, res)
        scores.update({f"Bleu_{n}": float(b) for n, b in enumerate(bleu, 1)})
    if "METEOR" in wanted:
        scores["METEOR"] = _meteor(gts, res)
    if "ROUGE_L" in wanted:
        scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in wanted:
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    """METEOR with its JVM pinned to an English locale and always shut down.

    Meteor.compute_score keeps its lock when it fails (e.g. the JVM died), and Meteor.__del__ then
    blocks on that lock forever, hanging the interpreter; so the lock is released and the process reaped
    here instead of relying on the garbage collector.
    """
    from pycocoevalcap.meteor.meteor import Meteor

    saved = os.environ.get("JAVA_TOOL_OPTIONS")
    os.environ["JAVA_TOOL_OPTIONS"] = f"{saved} {_JAVA_LOCALE}" if saved else _JAVA_LOCALE
    try:
        meteor = Meteor()  # Popen copies the environment here
    finally:
        if saved is None:
            del os.environ["JAVA_TOOL_OPTIONS"]
        else:
            os.environ["JAVA_TOOL_OPTIONS"] = saved
    try:
        return float(meteor.compute_score(gts, res)[0])
    except ValueError as error:  # the jar answered with an empty or garbled line: its stderr says why
        meteor.meteor_p.kill()
        stderr = meteor.meteor_p.stderr.read().decode(errors="replace").strip()
        raise RuntimeError(f"METEOR failed: {stderr[-2000:]}") from error
    finally:
        if meteor.lock.locked():
            meteor.lock.release()
        meteor.meteor_p.kill()
        meteor.meteor_p.communicate()  # reaps the JVM and closes the pipes


def _ptb_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """coco-caption's PTBTokenizer, with each caption on one line and its progress message kept quiet.

    The tokenizer writes one caption per line and matches output lines back by position, so a caption
    holding a carriage return (or U+2028, or any other line break Java honours) would silently shift
    every later caption onto the wrong image; so whitespace is collapsed first.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    flat = {i: [{"caption": " ".join(c.split())} for c in caps] for i, caps in captions.items()}
    with _java_stderr_filtered():
        tokenized = PTBTokenizer().tokenize(flat)
    if any(len(tokenized.get(i, ())) != len(caps) for i, caps in captions.items()):
        raise RuntimeError("the PTB tokenizer (Java) failed; its error is printed above")
    return tokenized


@contextlib.contextmanager
def _java_stderr_filtered() -> Iterator[None]:
    """Catch file descriptor 2 (which Java children inherit) and pass on all but the tokenizer's chatter."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines = sink.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(x for x in lines if not x.startswith("PTBTokenizer tokenized")))


def format_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """Markdown table of scores as percentages with one decimal, the way captioning papers print them.

    A metric missing from a row (scored on a subset) shows as "-".
    """
    lines = ["| Model | " + " | ".join(_HEADERS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name, scores in rows:
        cells = [f"{100 * scores[m]:.1f}" if m in scores else "-" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def repeated_bigrams(words: list[str]) -> int:
    """How many of the caption's word bigrams already occurred earlier in it."""
    bigrams = list(zip(words, words[1:]))
    return len(bigrams) - len(set(bigrams))


def fluency(captions: Sequence[str]) -> dict[str, float]:
    """What n-gram overlap does not show, over captions written as words separated by spaces (as the
    model writes them): the share ending in a function word ("a dog on the"), the share repeating a
    bigram ("a man in a red shirt and a red hat"), how many are distinct (a model that writes the same
    few captions for every image), and how many distinct words they use."""
    if not captions:
        raise ValueError("no captions to measure")
    words = [c.split() for c in captions]
    return {
        "ends_in_function_word": sum(bool(w) and w[-1] in FUNCTION_WORDS for w in words) / len(words),
        "repeated_bigram": sum(repeated_bigrams(w) > 0 for w in words) / len(words),
        "distinct_captions": len({tuple(w) for w in words}),
        "captions": len(words),
        "vocabulary": len({x for w in words for x in w}),
    }


def format_fluency_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """Markdown table of `fluency` figures: shares as percentages, distinct captions out of all."""
    lines = ["| Captions | Ends in a function word | Repeated bigram | Distinct captions | Vocabulary |",
             "|---|---:|---:|---:|---:|"]
    for name, f in rows:
        lines.append(f"| {name} | {100 * f['ends_in_function_word']:.1f}% | {100 * f['repeated_bigram']:.1f}% | "
                     f"{f['distinct_captions']} / {f['captions']} | {f['vocabulary']} |")
    return "\n".join(lines) + "\n"
