import shutil

import pytest

from captioner.cli import main
from captioner.metrics import METRICS, fluency, format_fluency_table, format_table, score_captions

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="coco-caption needs Java")

REFERENCES = {
    "dog": ["A brown dog runs across the grass.", "A dog running on a lawn", "The dog is playing outside ."],
    "beach": ["Two children build a sandcastle on the beach", "kids playing in the sand by the sea"],
    "bike": ["A man rides his bicycle down a mountain trail", "a cyclist on a dirt path in the woods"],
    "city": ["People walk along a busy city street at night", "a crowded street with lit shop windows"],
}


@needs_java
def test_all_metrics_for_a_perfect_prediction(monkeypatch):
    # A German JVM locale used to break METEOR's number parsing; the only METEOR test covers it too.
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-Duser.language=de -Duser.country=DE")
    predictions = {i: refs[0] for i, refs in REFERENCES.items()}
    scores = score_captions(predictions, {i: [p, p, p] for i, p in predictions.items()})
    assert tuple(scores) == METRICS
    for name in ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L"):
        assert scores[name] == pytest.approx(1.0), name


@needs_java
def test_distinct_references_give_cider_and_unrelated_captions_score_nothing():
    wanted = ("Bleu_4", "ROUGE_L", "CIDEr")
    good = score_captions({i: refs[0] for i, refs in REFERENCES.items()}, REFERENCES, wanted)
    assert good["CIDEr"] > 1.0 and good["Bleu_4"] > 0.5
    bad = score_captions({i: "zebras juggle purple umbrellas" for i in REFERENCES}, REFERENCES, wanted)
    assert bad == pytest.approx({"Bleu_4": 0.0, "ROUGE_L": 0.0, "CIDEr": 0.0}, abs=1e-6)


@needs_java
def test_subset_runs_only_what_is_asked_and_quietly(capfd):
    predictions = {"dog": "a dog runs on the grass", "bike": "a man rides a bicycle"}
    scores = score_captions(predictions, REFERENCES, ("CIDEr", "Bleu_4"))
    assert list(scores) == ["CIDEr", "Bleu_4"]
    out, err = capfd.readouterr()
    assert out == "" and "PTBTokenizer" not in err


@needs_java
def test_line_breaks_inside_a_caption_do_not_shift_the_others():
    # The PTB tokenizer is line based: a raw "\r" once moved "two men ..." onto the wrong image.
    references = {"a": ["a dog runs\ron the grass"], "b": ["two men play football in a park"]}
    predictions = {"a": "a dog runs on the grass", "b": "two men play football in a park"}
    assert score_captions(predictions, references, ("Bleu_4",))["Bleu_4"] == pytest.approx(1.0)


@pytest.mark.parametrize("references", [{}, {"dog": []}])
def test_a_prediction_without_references_is_an_error(references):
    with pytest.raises(ValueError, match="'dog'"):
        score_captions({"dog": "a dog"}, references)


def test_unknown_metric_is_an_error():
    with pytest.raises(ValueError, match="SPICE"):
        score_captions({"dog": "a dog"}, REFERENCES, ("SPICE",))


def test_missing_java_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install default-jre-headless"):
        score_captions({"dog": "a dog"}, REFERENCES)


@pytest.mark.parametrize("how", [["--nearest-neighbour"], ["--model", "no-such-model"]])
def test_evaluate_without_java_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path, how):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["evaluate", "--prepared", str(tmp_path), *how]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("captioner evaluate: error: java: not found;") and "default-jre-headless" in err


def test_format_table_prints_percentages():
    full = dict(zip(METRICS, (0.6364, 0.4458, 0.3054, 0.2094, 0.25, 0.4875, 0.7886)))
    table = format_table([("human", full), ("nn", {"Bleu_4": 0.1234, "CIDEr": 1.2346})])
    assert table == (
        "| Model | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | METEOR | ROUGE-L | CIDEr |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
        "| human | 63.6 | 44.6 | 30.5 | 20.9 | 25.0 | 48.8 | 78.9 |\n"
        "| nn | - | - | - | 12.3 | - | - | 123.5 |\n"
    )


def test_fluency_counts_what_each_figure_says():
    captions = [
        "a dog runs on the",  # ends in a function word
        "a man in a red shirt and a red hat",  # repeats the bigram "a red"
        "a dog runs on the",  # the same caption again
        "the the",  # both: ends in "the", but "the the" is one bigram, not repeated
        "a dog a dog",  # repeats "a dog"
        "",  # empty: neither
    ]
    figures = fluency(captions)
    assert figures == {"ends_in_function_word": 3 / 6, "repeated_bigram": 2 / 6, "distinct_captions": 5,
                       "captions": 6, "vocabulary": len({"a", "dog", "runs", "on", "the", "man", "in", "red",
                                                         "shirt", "and", "hat"})}
    # words, not characters: extra spaces change nothing, and "an" or "at" inside a word do not count
    assert fluency(["a  dog ", "a dog", "a cat sat"]) == {"ends_in_function_word": 0.0, "repeated_bigram": 0.0,
                                                          "distinct_captions": 2, "captions": 3, "vocabulary": 4}
    with pytest.raises(ValueError, match="no captions"):
        fluency([])


def test_format_fluency_table():
    row = {"ends_in_function_word": 0.0123, "repeated_bigram": 0.25, "distinct_captions": 412, "captions": 1000,
           "vocabulary": 387}
    assert format_fluency_table([("beam 3", row)]) == (
        "| Captions | Ends in a function word | Repeated bigram | Distinct captions | Vocabulary |\n"
        "|---|---:|---:|---:|---:|\n"
        "| beam 3 | 1.2% | 25.0% | 412 / 1000 | 387 |\n"
    )


def test_curves_show_dev_scores_x100_whether_metrics_csv_is_new_or_from_an_older_run(tmp_path):
    """A run writes dev scores x100 in dev_* columns; older runs wrote fractions in val_* columns. The column's
    name decides, not its values: a resumed older run (its first rows val_*, the rest dev_*) is one curve."""
    import csv
    import io

    from captioner.visualize import curves, plot_curves

    older = ("epoch,stage,train_loss,train_top5,val_Bleu_4,val_CIDEr,lr\n"
             "1,train,4.0,0.5,0.054,0.30,0.001\n"
             "2,train,3.0,0.6,0.081,0.42,0.001\n")
    rows = list(csv.DictReader(io.StringIO(older)))
    panels = curves(rows)
    assert panels["BLEU-4 (dev, x100)"] == {"dev": ([1.0, 2.0], [pytest.approx(5.4), pytest.approx(8.1)])}
    assert panels["CIDEr (dev, x100)"] == {"dev": ([1.0, 2.0], [pytest.approx(30.0), pytest.approx(42.0)])}
    assert panels["loss"] == {"train": ([1.0, 2.0], [4.0, 3.0])} and "lr" not in str(panels)

    resumed = rows + [{"epoch": 3, "stage": "train", "train_loss": 2.5, "train_top5": 0.7, "dev_loss": 2.8,
                       "dev_Bleu_4": 9.5, "dev_CIDEr": 47.0, "lr": 0.001}]
    panels = curves(resumed)
    assert panels["CIDEr (dev, x100)"] == {"dev": ([1.0, 2.0, 3.0], [pytest.approx(30.0), pytest.approx(42.0), 47.0])}
    assert panels["loss"] == {"train": ([1.0, 2.0, 3.0], [4.0, 3.0, 2.5]), "dev": ([3.0], [2.8])}
    pytest.importorskip("matplotlib")
    assert plot_curves(resumed, tmp_path / "curves.png") and (tmp_path / "curves.png").stat().st_size > 1000
