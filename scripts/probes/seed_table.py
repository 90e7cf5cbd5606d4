"""Report (not a test): the mean and spread over seeds of `captioner evaluate` results, one row a recipe.

Each GROUP is `NAME=EVAL,EVAL,...`: folders that `captioner evaluate --output` wrote (results.json),
one per seed of the recipe. A cell is the mean over the seeds, with the sample standard deviation in
brackets when there are several; the training time is the mean of the runs' summed epoch seconds
(metrics.csv beside the evaluated model's folder) and the best epoch is listed per seed.

    python scripts/probes/seed_table.py --beam 3 "attention LSTM=runs/eval/lstm-s0-test,runs/eval/lstm-s1-test"
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean = f"{scale * statistics.mean(values):.{digits}f}"
    return mean if len(values) < 2 else f"{mean} ({scale * statistics.stdev(values):.{digits}f})"


def run_of(result: dict) -> tuple[float, int] | None:
    """(summed epoch seconds, best epoch) of the training run that made the evaluated model, if found."""
    model = Path(result["model"])
    metrics = model.parent / "metrics.csv"
    if not metrics.exists():
        return None
    rows = list(csv.DictReader(metrics.open()))
    best = max(rows, key=dev_cider)
    return sum(float(r["seconds"]) for r in rows), int(best["epoch"])


def dev_cider(row: dict[str, str]) -> float:
    """An epoch's dev CIDEr x100: dev_CIDEr, or val_CIDEr (a fraction) in rows older runs wrote."""
    return float(row["dev_CIDEr"]) if row.get("dev_CIDEr") else 100 * float(row["val_CIDEr"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="+", help="NAME=EVAL_FOLDER,EVAL_FOLDER,...")
    parser.add_argument("--beam", type=int, default=3, help="the beam size whose scores are tabled")
    args = parser.parse_args()
    key = f"beam {args.beam}"
    print("| Recipe (seeds) | " + " | ".join(m.replace("_", "-") for m in METRICS)
          + " | repeated bigram | training time, h | best epoch per seed |")
    print("|---|" + "---:|" * (len(METRICS) + 3))
    for group in args.groups:
        name, _, folders = group.partition("=")
        results = []
        for folder in folders.split(","):
            path = Path(folder) / "results.json"
            if not path.exists():
                raise SystemExit(f"{path}: no such file (run captioner evaluate --output {folder})")
            result = json.loads(path.read_text())
            if key not in result["scores"]:
                raise SystemExit(f"{path}: no {key} scores (it has {', '.join(result['scores'])})")
            results.append((result, run_of(result)))
        scores = [r["scores"][key] for r, _ in results]
        cells = [cell([s[m] for s in scores]) for m in METRICS]
        cells.append(cell([r["fluency"][key]["repeated_bigram"] for r, _ in results]) + "%")
        runs = [run for _, run in results if run is not None]
        cells.append(cell([seconds for seconds, _ in runs], scale=1 / 3600, digits=2) if runs else "")
        cells.append(" / ".join(str(epoch) for _, epoch in runs))
        print(f"| {name} ({len(results)}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
