"""`captioner` command line: one subcommand per job, each a thin layer over the Python API."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from .config import BACKENDS, FITS, add_config_flags, add_decoding_flags, config_from_args, flags_given
from .decoding_options import MODEL_KEYS

DEVICE_HELP = "auto (CUDA when present), cpu, cuda, cuda:N or mps (default: auto)"
BACKEND_HELP = "torch, or onnx for a folder `export --format onnx` wrote (default: torch)"
# What Ctrl-C leaves, per command that can pick up where it stopped.
RESUME = {"prepare": "run the same command again to resume",
          "train": "add --resume to the same command to go on from the last checkpoint",
          "caption": "with a .jsonl --output, run the same command again to resume",
          "write-metadata": "run the same command again to resume; the photos already written are skipped"}
EVALUATE_KEYS = tuple(k for k in MODEL_KEYS if k != "beam_size")  # beam sizes: --beam-sizes
PREPARE_FLAGS = ["data", "format", "images", "prepared", "skip_missing", "holdout_words", "split_file", "max_images",
                 "min_count", "extra_vocabulary", "extra_min_count", "max_caption_length", "encoder", "image_size",
                 "feature_layer", "prepare_batch_size",
                 "encoder_from", "device"]


def cmd_prepare(args: argparse.Namespace) -> int:
    from .features import prepare

    cfg = config_from_args(args)
    if not cfg.data:
        raise SystemExit("captioner prepare: give the dataset folder or annotation file (--data PATH)")
    prepare(cfg)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .runtime import exit_distributed
    from .train import train

    train(config_from_args(args), resume=args.resume)
    exit_distributed()
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from .lr_find import lr_find

    lr_find(config_from_args(args), start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_model, evaluate_nearest_neighbour
    from .metrics import format_table, require_java

    if args.model or args.nearest_neighbour:
        require_java()  # before decoding a split, not after
    rows = []
    if args.model:
        beams = [int(b) for b in args.beam_sizes.split(",")] if args.beam_sizes else None
        rows += evaluate_model(args.model, args.prepared, args.split, beams, args.device, args.output,
                               ensemble=args.ensemble, datastore=args.datastore, **flags_given(args, EVALUATE_KEYS))
    if args.nearest_neighbour:
        rows.append(("nearest neighbour", evaluate_nearest_neighbour(args.prepared, args.split)))
    if not rows:
        raise SystemExit("captioner evaluate: give --model DIR and/or --nearest-neighbour")
    print(format_table(rows))
    return 0


def cmd_datastore(args: argparse.Namespace) -> int:
    from .datastore import REDUCED_DIM, build

    build(args.sources, args.output, split=args.split, reduced_dim=args.dim or REDUCED_DIM,
          log=lambda s: print(f"captioner datastore: {s}", file=sys.stderr, flush=True))
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from .adapt import adapt
    from .pipeline import DEFAULT_MODEL

    limit = {"max_photos": args.max_photos} if args.max_photos else {}
    adapt(args.model or DEFAULT_MODEL, args.library, args.output, epochs=args.epochs,
          log=lambda s: print(f"captioner adapt: {s}", file=sys.stderr, flush=True), **limit)
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    from .contrastive import evaluate_retrieval, format_recall

    print(format_recall(evaluate_retrieval(args.run, args.prepared, args.split, args.device)), end="")
    return 0


def cmd_add_retrieval_head(args: argparse.Namespace) -> int:
    from .contrastive import add_retrieval_head

    add_retrieval_head(args.run, args.model, args.prepared)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "onnx":
        if flags_given(args, MODEL_KEYS) or args.fit:
            raise SystemExit("captioner export: --format onnx keeps the model's decoding defaults and fit; export to "
                             "safetensors with new decoding defaults first, then that to onnx")
        if args.average:
            raise SystemExit("captioner export: --average writes safetensors; average first, then export that to onnx")
        return export_onnx_folder(args)
    if args.quantize != "none" or args.check_images:
        raise SystemExit("captioner export: --quantize and --check-images go with --format onnx")
    import torch

    from .decoding_options import DecodingOptions
    from .models import average_models, load_model, save_model
    from .models.files import DATASTORE_DIR, add_retrieval

    model = load_model(args.model)
    if args.average:
        model = average_models([model, *map(load_model, args.average)])
    decoding = {**model.decoding, **flags_given(args, MODEL_KEYS)}
    DecodingOptions(**decoding)  # an option out of range fails here, naming it, not when the model is used
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    save_model(args.output, model.decoder, model.vocab, model.encoder_spec, decoding, model.encoder_state, dtype,
               fit=args.fit or model.fit, familiarity=model.familiarity)
    embedder = load_model(args.model).embedder  # photo vectors read the encoder's features, so any fits the average
    if embedder is not None:
        datastore = Path(args.model) / DATASTORE_DIR
        add_retrieval(args.output, embedder, datastore=datastore if datastore.is_dir() else None)
    size = sum(f.stat().st_size for f in Path(args.output).rglob("*") if f.is_file())
    print(f"{args.output}: {args.dtype} weights, {size / 2**20:.1f} MiB; decoding "
          + ", ".join(f"{key} {value}" for key, value in decoding.items()))
    return 0


def export_onnx_folder(args: argparse.Namespace) -> int:
    from .data import expand_inputs, load_image
    from .onnx_export import export_onnx

    images = None
    if args.check_images:
        paths = expand_inputs(args.check_images)
        if not paths:
            raise SystemExit("captioner export: no images found in " + " ".join(args.check_images))
        images = [load_image(p) for p in paths]
    info = export_onnx(args.model, args.output, quantize=args.quantize, images=images)
    size = sum(f.stat().st_size for f in Path(args.output).iterdir())
    weights = "int8 decoder" if info["quantized"] else "float32"
    print(f"{args.output}: ONNX graphs ({weights} weights), {size / 2**20:.1f} MiB, "
          f"exported from weights sha256 {info['weights_sha256'][:12]}")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    if (args.overwrite_metadata or args.keep_mtime or args.sidecar) and not args.write_metadata:
        raise SystemExit("captioner caption: --overwrite-metadata, --keep-mtime and --sidecar go with --write-metadata")
    if (args.prune or args.wait or args.verbose) and not (args.output and Path(args.output).suffix == ".jsonl"):
        raise SystemExit("captioner caption: --prune, --wait and --verbose go with a .jsonl --output")
    if args.output and Path(args.output).suffix == ".jsonl":
        return caption_library(args)
    if args.write_metadata:
        raise SystemExit("captioner caption: --write-metadata goes with a .jsonl --output (the captions it writes "
                         "come from it)")
    from .data import ImageError, expand_inputs, load_image
    from .pipeline import Captioner, extras

    paths = expand_inputs(args.inputs)
    if not paths:
        raise SystemExit("captioner caption: no images found in " + " ".join(args.inputs))
    captioner = Captioner.from_pretrained(args.model, device=args.device, backend=args.backend,
                                          datastore=args.datastore)
    opts = captioner.options(**flags_given(args))
    failed = 0
    results: list[tuple[Path, list[dict], dict]] = []
    for s in range(0, len(paths), args.batch_size):
        loaded = []
        for path in paths[s:s + args.batch_size]:
            try:
                loaded.append((path, load_image(path)))
            except ImageError as err:
                failed += 1
                print(f"captioner caption: skipped {err}", file=sys.stderr)
        if not loaded:
            continue
        for (path, image), result in zip(loaded, captioner.generate([im for _, im in loaded], opts)):
            best = captioner.as_dicts(result.captions)
            results.append((path, best, extras(result)))
            if not args.json:
                print(f"{path}\t{best[0]['generated_text']}", flush=True)
            if args.attention:
                from .visualize import attention_figure

                words, alphas = captioner.attention_maps(result.captions[0])
                attention_figure(captioner.encoder.crop(image), words, alphas,
                                 Path(args.attention) / f"{path.stem}.png")
    if args.json:
        print(json.dumps([{"file": str(p), "captions": c, **more} for p, c, more in results], indent=1))
    if args.output:
        with open(args.output, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "rank", "caption", "score", "source"])
            for path, captions, _ in results:
                for rank, c in enumerate(captions, 1):
                    writer.writerow([str(path), rank, c["generated_text"], c["score"], c.get("source", "decoder")])
    return 1 if failed else 0


def caption_library(args: argparse.Namespace) -> int:
    """`caption LIBRARY/ --output captions.jsonl`: streaming, resumable, sharded under torchrun (bulk.py)."""
    from . import bulk
    from .pipeline import Captioner
    from .runtime import exit_distributed, rank_device, shard

    if len(args.inputs) != 1 or not Path(args.inputs[0]).is_dir():
        raise SystemExit("captioner caption: a .jsonl --output takes one library folder, got " + " ".join(args.inputs))
    if args.json or args.attention:
        raise SystemExit("captioner caption: --json and --attention do not go with a .jsonl --output")
    if args.write_metadata:
        from .metadata import exiv2

        exiv2()  # a missing package fails now, not after hours of captioning
    if not args.wait and shard()[0] == 0 and (holder := bulk.lock_holder(args.output)):  # before the model loads
        raise bulk.OutputLocked(bulk.locked_message(Path(args.output), holder))
    captioner = Captioner.from_pretrained(args.model, device=rank_device(args.device), backend=args.backend,
                                          datastore=args.datastore)
    opts = captioner.options(**flags_given(args))
    summary = bulk.caption_library(captioner, args.inputs[0], args.output, opts, batch_size=args.batch_size,
                                   workers=args.workers, prune=args.prune, wait=args.wait, verbose=args.verbose)
    rank, world = shard()
    who = f"rank {rank} of {world}: " if world > 1 else ""
    print(f"captioner caption: {who}{summary.line()}", file=sys.stderr)
    exit_distributed()
    if args.write_metadata and rank == 0:  # rank 0 holds the merged output
        return write_metadata(args.output, args.inputs[0], args, "caption")
    return 0


def cmd_write_metadata(args: argparse.Namespace) -> int:
    return write_metadata(args.captions, args.photos, args, "write-metadata")


def write_metadata(captions: str, photos: str, args: argparse.Namespace, command: str) -> int:
    """Captions of a bulk JSONL into its photos' metadata (metadata.py); 1 when a photo could not be written."""
    from .metadata import write_library

    s = write_library(captions, photos, overwrite=args.overwrite_metadata, keep_mtime=args.keep_mtime,
                      sidecar=args.sidecar, wait=args.wait)
    where = "XMP sidecars" if args.sidecar else "photos"
    print(f"captioner {command}: metadata of {s.written} {where} written, {s.already_done} already had their caption, "
          f"{s.kept} kept a description of their own (--overwrite-metadata replaces it; its concepts were added as "
          f"keywords), {s.unsupported} in formats that cannot hold one, {s.failed} failed (listed above), "
          f"{s.unread} lines the captioning could not read"
          f"{'; --sidecar writes XMP sidecars beside them' if s.unsupported and not args.sidecar else ''}",
          file=sys.stderr)
    return 1 if s.failed else 0


def add_metadata_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite-metadata", action="store_true",
                   help="replace a description a photo already has (default: such photos are left as they are)")
    p.add_argument("--keep-mtime", action="store_true", help="keep each photo's modification time as it was")
    p.add_argument("--sidecar", action="store_true",
                   help="write an XMP sidecar beside each photo (NAME.ext.xmp, as darktable and digiKam name them) "
                        "instead of touching the photo; merged into a sidecar already there; the only way for RAW "
                        "and HEIC files")
    p.add_argument("--wait", action="store_true",
                   help="when another run is writing the same .jsonl (it holds NAME.jsonl.lock), wait for it "
                        "instead of stopping")


def cmd_serve(args: argparse.Namespace) -> int:
    from .extras import install_hint
    from .pipeline import Captioner

    try:
        import uvicorn

        from .serve import access_control, create_app, example_photos
    except ModuleNotFoundError as err:  # the serve extra's packages: FastAPI, uvicorn, Gradio
        raise ImportError(f"captioner serve needs {err.name}: {install_hint('serve')}") from err

    if (args.library is None) != (args.photos is None):
        raise SystemExit("captioner serve: --library captions.jsonl and --photos LIBRARY/ (the folder it captioned) "
                         "go together")
    library = None
    if args.library:
        from .search import open_library
        from .sentences import load_sentence_encoder

        library = open_library(args.library, args.photos, load_sentence_encoder(),
                               log=lambda s: print(f"captioner serve: {s}", file=sys.stderr, flush=True))
    captioner = Captioner.from_pretrained(args.model, device=args.device, backend=args.backend,
                                          datastore=args.datastore)
    limits = {"max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms, "max_pixels": args.max_pixels,
              "max_upload_bytes": int(args.max_upload_mb * 2**20) if args.max_upload_mb is not None else None}
    access, warning = access_control(args.host, args.api_key, args.max_inflight_per_client)
    app = create_app(captioner, examples=example_photos(args.examples), ui=not args.no_ui, library=library, **access,
                     cors_origins=args.cors_origin,
                     **{k: v for k, v in limits.items() if v is not None})  # unset: create_app's defaults
    print(f"captioner serve: model {captioner.name} on {captioner.device}; "
          f"page http://{args.host}:{args.port}/  API docs http://{args.host}:{args.port}/docs", flush=True)
    if warning:
        print(f"captioner serve: warning: {warning}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Rank a captioned library's photos against the query (search.py): score, file and caption a line."""
    import contextlib

    from .search import IMAGE_WEIGHT, build_index, search_rows
    from .sentences import load_sentence_encoder

    if not args.query.strip():
        raise ValueError('the query is empty: say what to look for, e.g. "two dogs on a beach" or "cat"')
    if args.image_weight is None:
        args.image_weight = IMAGE_WEIGHT
    if not 0 <= args.image_weight <= 1:
        raise ValueError(f"--image-weight {args.image_weight}: a share of the score, from 0 to 1")
    if not Path(args.captions).is_file():
        raise SystemExit(f"captioner search: {args.captions}: no such file (make one with `captioner caption "
                         "LIBRARY/ --output captions.jsonl`)")
    with contextlib.redirect_stdout(sys.stderr):  # whatever loading the model prints: stdout is the results
        encoder = load_sentence_encoder(device=args.device)
    index = build_index(args.captions, encoder, log=lambda s: print(s, file=sys.stderr))
    rows, scores = search_rows(index, encoder, args.query, args.top, args.image_weight)
    found = [(index.files[row], round(float(score), 4), index.captions[row]) for row, score in zip(rows, scores)]
    if args.json:
        print(json.dumps([{"file": f, "score": s, "caption": c} for f, s, c in found], indent=1, ensure_ascii=False))
    else:
        for file, score, caption in found:
            print(f"{score:.3f}\t{file}\t{caption}")
    return 0


def positive_int(text: str) -> int:
    """argparse type: a count of at least 1 (a batch of 0 images never ends; -1 silently did nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description="Neural image captioning.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="read a dataset, build the vocabulary, cache encoder features")
    add_config_flags(p, PREPARE_FLAGS)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a decoder on a prepared folder (stage 1), then fine-tune (stage 2)")
    add_config_flags(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("lr-find", help="learning-rate range test: plot loss against learning rate")
    add_config_flags(p)
    p.add_argument("--start-lr", type=float, default=1e-7, help="first learning rate tried (default: 1e-7)")
    p.add_argument("--end-lr", type=float, default=1.0, help="last learning rate tried (default: 1.0)")
    p.add_argument("--steps", type=int, default=100, help="batches, one per rate, spaced geometrically (default: 100)")
    p.set_defaults(func=cmd_lr_find)

    p = sub.add_parser("evaluate", help="coco-caption scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr) on a split")
    p.add_argument("--model", help="model folder (e.g. runs/NAME/best)")
    p.add_argument("--prepared", default="prepared", help="prepared folder of the dataset (default: prepared)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to score (default: test)")
    p.add_argument("--beam-sizes", help="comma-separated beam sizes to score, e.g. 1,3,5 (default: the model's own)")
    add_decoding_flags(p, EVALUATE_KEYS)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--output", help="folder for results.json and captions (default: MODEL-eval_SPLIT beside the model)")
    p.add_argument("--ensemble", nargs="+", default=[], metavar="DIR",
                   help="more models on the same features: each word's probabilities are averaged with --model's")
    p.add_argument("--nearest-neighbour", action="store_true", help="also score the retrieval baseline")
    p.add_argument("--datastore", metavar="DIR", help="a retrieval model reads the captions of this datastore "
                   "(`captioner datastore build`) instead of its own: your captions steer its words")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("datastore", help="build a caption datastore a retrieval model reads (MiniLM vectors of "
                                         "human captions)")
    p.add_argument("action", choices=["build"], help="build: embed the captions of SOURCES into --output")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="caption files in any format prepare reads (JSONL, "
                   "CSV, a Flickr token file, COCO or Karpathy JSON), gzip-compressed or not")
    p.add_argument("--output", required=True, metavar="DIR", help="the datastore folder to write")
    p.add_argument("--split", default="", choices=["", "train", "val", "test"],
                   help="keep only this split's captions where a source has splits (default: all)")
    p.add_argument("--dim", type=positive_int, help="dimensions kept by PCA, stored as int8 (default: datastore.py's "
                   "REDUCED_DIM, 96)")
    p.set_defaults(func=cmd_datastore)

    p = sub.add_parser("adapt", help="fit a retrieval model's image vectors to a photo library without captions "
                                     "(pseudo-captions by consensus), for the photos its familiarity check calls "
                                     "unfamiliar; the others keep theirs")
    p.add_argument("library", help="a folder of photos (subfolders too), as `caption` reads it")
    p.add_argument("--output", required=True, metavar="DIR", help="the adapted model folder to write")
    p.add_argument("--model", help="the retrieval model to adapt (default: the shipped model)")
    p.add_argument("--epochs", type=positive_int, default=3,
                   help="passes over the library's pseudo-captions (default 3)")
    p.add_argument("--max-photos", type=positive_int, help="photos used at most, evenly spread over the library "
                   "(their features stay in memory: 0.12 MB each; default: adapt.py's MAX_PHOTOS, 5,000)")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("retrieve", help="image<->caption retrieval recall@1/5/10 of a contrastive pretraining")
    p.add_argument("--run", required=True, help="run folder trained with --pretrain contrastive, or its pretrain.pt")
    p.add_argument("--prepared", default="prepared", help="prepared folder of the dataset")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_retrieve)

    p = sub.add_parser("add-retrieval-head", help="ship a contrastive pretraining's image side and head with a model "
                                                  "folder (retrieval.safetensors), so search can rank photos by it")
    p.add_argument("--run", required=True, help="run folder trained with --pretrain contrastive, or its pretrain.pt")
    p.add_argument("--model", required=True, help="the model folder to add it to (trained on the same features)")
    p.add_argument("--prepared", help="the prepared folder the run trained on: print the dev split's recall in "
                                      "float32 and as stored (float16), which should agree within 0.1")
    p.set_defaults(func=cmd_add_retrieval_head)

    p = sub.add_parser("caption", help="caption image files, folders or globs with a trained model")
    p.add_argument("inputs", nargs="+", metavar="PATH", help="image files, folders of images, or globs")
    p.add_argument("--model", help="model folder (default: the model shipped with captioner)")
    add_decoding_flags(p)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--backend", default="torch", choices=BACKENDS, help=BACKEND_HELP)
    p.add_argument("--datastore", metavar="DIR", help="a retrieval model reads the captions of this datastore "
                   "(`captioner datastore build`) instead of its own: your captions steer its words")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per model pass (default: 8)")
    p.add_argument("--json", action="store_true", help="print JSON with n-best captions and scores")
    p.add_argument("--output", help="NAME.jsonl: caption a whole library folder, one JSON line per image as it "
                   "goes, resumable, sharded under torchrun; any other name: also write a CSV (file, rank, "
                   "caption, score)")
    p.add_argument("--workers", type=int, default=2,
                   help="threads reading and resizing images while the model runs (with a .jsonl --output)")
    p.add_argument("--attention", metavar="DIR", help="write one attention picture (PNG) per image into DIR")
    p.add_argument("--write-metadata", action="store_true",
                   help="with a .jsonl --output: then write each caption into its photo's XMP, IPTC and EXIF "
                        "description, and its concepts as keywords (the metadata extra)")
    p.add_argument("--prune", action="store_true",
                   help="with a .jsonl --output: drop the lines of files no longer in the library, and lines a "
                        "later one replaced (a photo edited since is captioned again)")
    p.add_argument("--verbose", action="store_true",
                   help="with a .jsonl --output: name on stderr each file the walk passes over, and why (the "
                        "last line counts them by reason)")
    add_metadata_flags(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("write-metadata", help="write a captioned library's captions (a bulk .jsonl) into its photos' "
                                              "XMP, IPTC and EXIF descriptions and keywords, without captioning again")
    p.add_argument("captions", help="the .jsonl `caption LIBRARY/ --output NAME.jsonl` wrote")
    p.add_argument("--photos", required=True, metavar="LIBRARY", help="the folder that .jsonl captioned")
    add_metadata_flags(p)
    p.set_defaults(func=cmd_write_metadata)

    p = sub.add_parser("search", help="find photos of a captioned library (a bulk .jsonl) by describing them")
    p.add_argument("captions", help="the .jsonl `caption LIBRARY/ --output NAME.jsonl` wrote")
    p.add_argument("query", help='what to look for, e.g. "two dogs on a beach"')
    p.add_argument("--top", type=positive_int, default=10, help="how many photos to list (default: 10)")
    p.add_argument("--json", action="store_true", help="print JSON: file, score and caption, best first")
    p.add_argument("--device", default="cpu", help="device of the sentence encoder (default: cpu)")
    p.add_argument("--image-weight", type=float, metavar="W",
                   help="the photo's own image vector's share of its score, 0 to 1, the rest its caption's and "
                        "concepts' (default: 0.9, search.IMAGE_WEIGHT); a one-word query puts the photos tagged or "
                        "captioned with that word first whatever the weight")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("serve", help="REST API (/api/caption, /docs) and browser UI (/) in one process")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", help="model folder (default: the model shipped with captioner)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--backend", default="torch", choices=BACKENDS, help=BACKEND_HELP)
    p.add_argument("--datastore", metavar="DIR", help="a retrieval model reads the captions of this datastore "
                   "(`captioner datastore build`) instead of its own: your captions steer its words")
    p.add_argument("--max-batch-size", type=int, help="images per model pass (16); 1 turns batching off")
    p.add_argument("--batch-wait-ms", type=float, help="how long a batch waits for more requests (20)")
    p.add_argument("--max-upload-mb", type=float, help="largest image file accepted (10)")
    p.add_argument("--max-pixels", type=int, help="largest image accepted, in pixels (50 million)")
    p.add_argument("--examples", help="folder of example photos for the page (default: examples/photos)")
    p.add_argument("--no-ui", action="store_true", help="serve the REST API only")
    p.add_argument("--library", metavar="CAPTIONS.jsonl",
                   help="a captioned library (`caption LIBRARY/ --output NAME.jsonl`) to search on the page and at "
                        "/api/search (the contrastive extra: MiniLM); its search index is built or updated at start")
    p.add_argument("--photos", metavar="LIBRARY", help="with --library: the folder it captioned (for thumbnails)")
    p.add_argument("--api-key", help="require this key on /api/caption (Authorization: Bearer KEY) and as the page's "
                                     "password; default: the environment variable CAPTIONER_API_KEY, which keeps "
                                     "the key out of the process list; unset: no key")
    p.add_argument("--max-inflight-per-client", type=int, metavar="N",
                   help="requests one client address may have in flight on /api/caption, 429 beyond; default: off "
                        "on loopback, 8 when --host serves other machines; 0 turns it off")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let pages served from ORIGIN (https://example.com) call the API from a browser (CORS); "
                        "repeat it for more; default: none, so only the server's own page")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="pack a trained model folder for shipping (float16 safetensors by default), "
                                      "or export it to ONNX graphs for onnxruntime")
    p.add_argument("model", help="model folder, e.g. runs/NAME/best")
    p.add_argument("output", help="folder to write")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "onnx"])
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="weights of a safetensors export")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="onnx: int8 decoder weights (dynamic quantization)")
    p.add_argument("--check-images", nargs="+", metavar="PATH",
                   help="onnx: images to check the graphs against PyTorch on (default: 3 generated ones)")
    p.add_argument("--average", nargs="+", metavar="MODEL",
                   help="safetensors: write the mean of MODEL's and these models' weights (runs from one start, "
                        "such as seeds of self-critical training)")
    p.add_argument("--fit", choices=FITS, help="safetensors: how the exported model meets a photo that is not "
                   "square: crop, or squash for a model trained on photos made square by squashing (Flickr8k's "
                   "224 x 224 copies); default: the model's own")
    add_decoding_flags(p, MODEL_KEYS, default="safetensors: the exported model keeps the model's own")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    from . import apply_thread_policy

    apply_thread_policy()  # before any command imports torch, whose OpenMP reads the policy once, at load
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as err:  # bad input, a missing file or package, a full disk
        print(f"captioner {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        how = RESUME.get(args.command, "nothing was lost")
        print(f"\ncaptioner {args.command}: interrupted; {how}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
