"""A model folder of the epoch a run last finished (its last.pt), not the one it kept as best/, optionally with
another generate_bias (how far a retrieval decoder's copy gate leans to its own words when captioning): how
docs/experiments/2026-12-07-retrieval-augmented-captioning.md scored epochs and gate settings the runs did not
keep. The folder is best/'s (embedder, datastore, decoding) with last.pt's decoder weights.

    python scripts/probes/epoch_model.py runs/flickr8k-retrieval /tmp/epoch --generate-bias 2
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from pathlib import Path

import torch

from captioner.models import load_model, save_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder with best/ and last.pt")
    parser.add_argument("output", type=Path)
    parser.add_argument("--generate-bias", type=float, help="a retrieval decoder's generate_bias (default: kept)")
    args = parser.parse_args()
    model = load_model(args.run / "best")
    last = torch.load(args.run / "last.pt", map_location="cpu", weights_only=False)
    model.decoder.load_state_dict(last["decoder"])
    if args.generate_bias is not None:
        model.decoder.args = dataclasses.replace(model.decoder.args, generate_bias=args.generate_bias)
    shutil.copytree(args.run / "best", args.output, dirs_exist_ok=True)  # the embedder and datastore
    with tempfile.TemporaryDirectory() as tmp:
        save_model(Path(tmp) / "m", model.decoder, model.vocab, model.encoder_spec, model.decoding)
        for name in ("model.json", "model.safetensors"):
            shutil.copy(Path(tmp) / "m" / name, args.output / name)
    print(f"{args.output}: {args.run / 'last.pt'}'s decoder"
          + (f", generate_bias {args.generate_bias}" if args.generate_bias is not None else ""))


if __name__ == "__main__":
    main()
