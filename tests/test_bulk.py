"""Bulk captioning (`caption LIBRARY/ --output captions.jsonl`): streaming walk, resume after SIGKILL,
half-written last lines, bad files, and sharding with torchrun."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner import bulk

from helpers import ROOT, train_tiny_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the CPU is shared: one thread per process keeps runs steady


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model (64 px encoder input, 16-wide decoder) trained for one epoch: captions hundreds of
    images in seconds."""
    return train_tiny_model(tmp_path_factory.mktemp("bulk-model"), image_size=64)[1]


def make_library(root: Path, n: int) -> list[str]:
    """n small noise images spread over nested folders; returns their relative paths."""
    rng = np.random.default_rng(1)
    names = []
    for i in range(n):
        name = f"{['2019', '2020/summer', '2020/winter', ''][i % 4]}/img{i:04d}.{'png' if i % 3 else 'jpg'}".lstrip("/")
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / name)
        names.append(name)
    return names


def caption_cmd(library: Path, output: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "captioner.cli", "caption", str(library), "--output", str(output),
            "--model", str(model), "--device", "cpu", "--batch-size", "4", *extra]


def run(library: Path, output: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(caption_cmd(library, output, model, *extra), capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=600)


def records(output: Path) -> list[dict]:
    return [json.loads(line) for line in output.read_text().splitlines()]


def by_file(output: Path) -> dict[str, dict]:
    out = records(output)
    files = [r["file"] for r in out]
    assert len(files) == len(set(files)), "an image appears more than once"
    return {r["file"]: r for r in out}


def assert_same_captions(got: dict[str, dict], want: dict[str, dict]) -> None:
    """Same files, same caption texts; scores to rounding (batches are cut differently after a resume)."""
    assert got.keys() == want.keys()
    for name, record in want.items():
        if "error" in record:
            assert got[name]["error"] == record["error"]
            continue
        assert [c["generated_text"] for c in got[name]["captions"]] == [c["generated_text"] for c in record["captions"]]
        assert got[name]["captions"][0]["score"] == pytest.approx(record["captions"][0]["score"], abs=1e-3)


@pytest.fixture(scope="module")
def library(tmp_path_factory, model_dir) -> tuple[Path, dict[str, dict]]:
    """300 images and their captions from one uninterrupted run."""
    root = tmp_path_factory.mktemp("library")
    names = make_library(root / "photos", 300)
    result = run(root / "photos", root / "reference.jsonl", model_dir)
    assert result.returncode == 0, result.stderr
    reference = by_file(root / "reference.jsonl")
    assert sorted(reference) == sorted(names)
    return root / "photos", reference


def test_walk_is_lazy_sorted_and_skips_hidden_and_other_files(tmp_path, monkeypatch):
    for name in ["b/2.jpg", "b/10.png", "a/z/1.JPG", "a/y.webp", "c.gif", ".thumbs/t.jpg", "b/._2.jpg", "b/notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)  # would never end if followed
    assert list(bulk.walk_library(tmp_path)) == ["a/y.webp", "a/z/1.JPG", "b/10.png", "b/2.jpg", "c.gif"]

    listed = []
    real_scandir = os.scandir
    monkeypatch.setattr(bulk.os, "scandir", lambda p: listed.append(p) or real_scandir(p))
    walk = bulk.walk_library(tmp_path)
    assert next(walk) == "a/y.webp"
    assert [Path(p).name for p in listed] == [tmp_path.name, "a"]  # b/ not listed yet: the walk streams


def walk_and_skips(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """What the walk finds, and what it passes over with the reasons."""
    passed: list[tuple[str, str]] = []
    found = list(bulk.walk_library(root, on_skip=lambda key, reason: passed.append((key, reason))))
    return found, passed


def test_walk_says_what_it_passes_over_and_why(tmp_path):
    for name in ["a.jpg", "b.HEIC", "notes.txt", "IMG_0001.MOV", "scan.psd", "logo.svg", ".DS_Store", "._a.jpg",
                 ".thumbs/t.jpg", "sub/c.cr2", "sub/c.xmp"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    (outside / "more").mkdir(parents=True)
    (outside / "d.jpg").write_bytes(b"x")
    (tmp_path / "linked").symlink_to(outside / "more", target_is_directory=True)
    (tmp_path / "other.jpg").symlink_to(outside / "d.jpg")  # a link to a photo out of the library is a photo
    (tmp_path / "same.jpg").symlink_to(tmp_path / "a.jpg")  # a.jpg is found by its own path
    found, passed = walk_and_skips(tmp_path)
    assert found == ["a.jpg", "b.HEIC", "other.jpg", "sub/c.cr2"]
    assert sorted(passed) == sorted([
        ("notes.txt", "not an image"), ("IMG_0001.MOV", "not an image"), ("sub/c.xmp", "not an image"),
        ("scan.psd", "unsupported format"), ("logo.svg", "unsupported format"), (".DS_Store", "hidden"),
        ("._a.jpg", "hidden"), (".thumbs/", "hidden"), ("gone.jpg", "broken link"), ("linked/", "linked folder"),
        ("same.jpg", "reached twice through a link")])
    assert {reason for _, reason in passed} == set(bulk.PASSED_OVER)


def test_a_photo_reached_through_links_is_found_once_and_loops_end(tmp_path):
    """A link to a photo or folder the walk reaches by its own path is passed over (the photo is captioned
    once, under its own path, whichever comes first in walk order); several links to one photo the walk does
    not reach otherwise give it once; link loops, of folders or of files, neither hang nor stop the walk."""
    lib, outside = tmp_path / "lib", tmp_path / "outside"
    for name in ["lib/a/cat.jpg", "lib/z/dog.jpg", "lib/.private/p.jpg", "lib/blob", "outside/o.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (lib / "link").symlink_to(lib / "a", target_is_directory=True)  # lib/link/cat.jpg is lib/a/cat.jpg
    (lib / "b").mkdir()
    (lib / "b" / "cat-again.jpg").symlink_to("../a/cat.jpg")
    (lib / "a" / "up").symlink_to(lib, target_is_directory=True)  # a loop: lib/a/up/a/up/...
    (lib / "a" / "y").symlink_to("../z", target_is_directory=True)  # sorts before what it links to
    (lib / "a" / "self").symlink_to(lib / "a" / "self")  # a link to itself
    (lib / "a" / "loop1.jpg").symlink_to("loop2.jpg")
    (lib / "a" / "loop2.jpg").symlink_to("loop1.jpg")
    (lib / "out1.jpg").symlink_to(outside / "o.jpg")
    (lib / "out2.jpg").symlink_to(outside / "o.jpg")
    (lib / "private.jpg").symlink_to(lib / ".private" / "p.jpg")  # hidden: not found by its own path
    (lib / "blob.jpg").symlink_to(lib / "blob")  # not found by its own path (no image suffix)
    (lib / "library").symlink_to(lib, target_is_directory=True)
    (tmp_path / "alias").symlink_to(lib, target_is_directory=True)  # the library given through a link

    for root in (lib, tmp_path / "alias"):
        found, passed = walk_and_skips(root)
        assert found == ["a/cat.jpg", "blob.jpg", "out1.jpg", "private.jpg", "z/dog.jpg"]
        twice = "reached twice through a link"
        assert sorted(passed) == sorted([
            (".private/", "hidden"), ("a/loop1.jpg", "broken link"), ("a/loop2.jpg", "broken link"),
            ("a/self", "broken link"), ("a/up/", twice), ("a/y/", twice), ("b/cat-again.jpg", twice),
            ("blob", "not an image"), ("library/", twice), ("link/", twice), ("out2.jpg", twice)])


def test_verbose_names_each_file_passed_over_and_a_linked_photo_is_captioned_once(tmp_path, capsys):
    """`--verbose` lists what the walk passed over, one file a line with its reason, on stderr before the
    summary, never in the JSONL; a photo reached again through a linked folder or file gets one line."""
    from captioner import cli

    lib = tmp_path / "lib"
    (lib / "a").mkdir(parents=True)
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(lib / "a" / "cat.jpg")
    (lib / "link").symlink_to(lib / "a", target_is_directory=True)
    (lib / "cat-again.jpg").symlink_to(lib / "a" / "cat.jpg")
    (lib / "notes.txt").write_text("x")
    (lib / "._cat.jpg").write_bytes(b"x")
    out = tmp_path / "x.jsonl"
    argv = ["caption", str(lib), "--output", str(out), "--device", "cpu"]
    assert cli.main([*argv, "--verbose"]) == 0
    err = capsys.readouterr().err.splitlines()
    listed = [line for line in err if line.startswith("passed over ")]
    twice = "reached twice through a link"
    assert sorted(listed) == ["passed over ._cat.jpg: hidden", f"passed over cat-again.jpg: {twice}",
                              f"passed over link/: {twice}", "passed over notes.txt: not an image"]
    assert err[-1].startswith("captioner caption: 1 images captioned")
    assert f", 4 passed over (1 not an image, 1 hidden, 2 {twice})" in err[-1]
    assert [r["file"] for r in records(out)] == ["a/cat.jpg"] and b"passed over" not in out.read_bytes()

    assert cli.main(argv) == 0  # without --verbose: the counts alone
    err = capsys.readouterr().err
    assert "passed over " not in err.replace("4 passed over (", "") and "1 already done, 4 passed over" in err
    with pytest.raises(SystemExit, match="--verbose go with a .jsonl --output"):
        cli.main(["caption", str(lib), "--output", str(tmp_path / "x.csv"), "--verbose"])


def test_summary_line_counts_what_was_passed_over_by_reason():
    plain = bulk.Summary(captioned=6, failed=3, already_done=9, seconds=2.0)
    assert plain.line() == "6 images captioned, 3 unreadable (listed with their error), 9 already done; 3.0 images/s"
    plain.passed_over = {"hidden": 2, "not an image": 3, "broken link": 1}
    assert plain.line() == ("6 images captioned, 3 unreadable (listed with their error), 9 already done, 6 passed "
                            "over (3 not an image, 2 hidden, 1 broken link); 3.0 images/s")


def test_json_lines_keep_non_ascii_names_readable():
    line = bulk.json_line({"file": "2019/Café.jpg", "captions": [{"generated_text": "a dog", "score": -1.0}]})
    assert '"file": "2019/Café.jpg"' in line and line.endswith("}\n") and line.count("\n") == 1
    assert json.loads(line.encode("utf-8"))["file"] == "2019/Café.jpg"
    undecodable = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name on a UTF-8 system: a lone surrogate in Python
    line = bulk.json_line({"file": undecodable})
    line.encode("utf-8")  # still writable as UTF-8
    file = json.loads(line)["file"]
    assert file == undecodable and bulk.path_hash(file) == bulk.path_hash(undecodable)


@pytest.mark.slow
def test_phone_formats_and_non_ascii_names_get_their_lines(model_dir, tmp_path):
    """HEIC and AVIF are captioned by the walk, not passed over; a non-ASCII name stays readable in the JSONL;
    the summary counts what was passed over."""
    from PIL import features

    from captioner.pipeline import Captioner

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(2)
    pixels = lambda: Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))  # noqa: E731
    pixels().save(photos / "Café.jpg")
    want = {"Café.jpg"}
    if features.check("avif"):
        pixels().save(photos / "espresso.avif")
        want.add("espresso.avif")
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        pixels().save(photos / "kitten.heic")
        want.add("kitten.heic")
    except ImportError:
        pass
    (photos / "notes.txt").write_text("x")
    (photos / ".hidden.jpg").write_bytes(b"x")
    (photos / "gone.jpg").symlink_to(photos / "deleted.jpg")
    output = tmp_path / "out.jsonl"
    captioner = Captioner.from_pretrained(model_dir, device="cpu")
    summary = bulk.caption_share(captioner, photos, output, captioner.options(), batch_size=2, progress=False)
    assert (summary.captioned, summary.failed) == (len(want), 0)
    assert summary.passed_over == {"not an image": 1, "hidden": 1, "broken link": 1}
    raw = output.read_bytes()
    assert '"file": "Café.jpg"'.encode() in raw and b"\\u00e9" not in raw
    assert {r["file"] for r in records(output) if r["captions"][0]["generated_text"]} == want


def test_done_set_finds_exactly_its_members():
    hashes = [bulk.path_hash(f"dir/{i}.jpg") for i in range(1000)]
    odd = b"\x07" * 15 + b"\x00"  # numpy drops trailing NULs of "S" items; membership must not
    done = bulk.DoneSet(b"".join(hashes[::2]) + odd)
    assert len(done) == 501
    assert all(h in done for h in hashes[::2]) and not any(h in done for h in hashes[1::2])
    assert odd in done and b"\x07" * 15 + b"\x01" not in done and b"\x07" * 16 not in done
    assert b"\x00" * 16 not in bulk.DoneSet()


@pytest.mark.slow
@pytest.mark.cli
def test_resume_after_sigkill_captions_each_image_exactly_once(library, model_dir, tmp_path):
    photos, reference = library
    output = tmp_path / "captions.jsonl"
    proc = subprocess.Popen(caption_cmd(photos, output, model_dir), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while (not output.exists() or output.read_bytes().count(b"\n") < 40) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = output.read_bytes().count(b"\n")
    assert 40 <= at_kill < len(reference), at_kill  # killed partway

    result = run(photos, output, model_dir)
    assert result.returncode == 0, result.stderr
    assert f"{at_kill} already done" in result.stderr  # none of them recomputed
    assert f"{len(reference) - at_kill} images captioned" in result.stderr
    assert_same_captions(by_file(output), reference)


@pytest.mark.slow
@pytest.mark.cli
def test_half_written_last_line_is_cut_off_and_redone(library, model_dir, tmp_path):
    photos, reference = library
    lines = [json.dumps(r) for r in reference.values()]
    first = json.loads(lines[0])
    first["captions"][0]["generated_text"] = "kept from the first run"  # shows the line is not recomputed
    output = tmp_path / "captions.jsonl"
    output.write_text(json.dumps(first) + "\n" + "\n".join(lines[1:120]) + "\n" + lines[120][:37])

    result = run(photos, output, model_dir)
    assert result.returncode == 0, result.stderr
    assert "half-written last line" in result.stderr and "120 already done" in result.stderr
    got = by_file(output)
    assert got[first["file"]]["captions"][0]["generated_text"] == "kept from the first run"
    got[first["file"]] = reference[first["file"]]
    assert_same_captions(got, reference)


@pytest.mark.slow
@pytest.mark.cli
def test_bad_files_are_listed_with_their_error_and_the_run_goes_on(model_dir, tmp_path):
    photos = tmp_path / "photos"
    names = make_library(photos, 6)
    (photos / "2019" / "broken.jpg").write_bytes((photos / names[0]).read_bytes()[:60])
    (photos / "empty.png").write_bytes(b"")
    (photos / "2020" / "notes.jpg").write_text("not a picture")
    output = tmp_path / "out.jsonl"
    result = run(photos, output, model_dir)
    assert result.returncode == 0, result.stderr  # every file handled; the failures are in the output
    assert "6 images captioned, 3 unreadable" in result.stderr
    got = by_file(output)
    errors = {name: r["error"] for name, r in got.items() if "error" in r}
    assert set(errors) == {"2019/broken.jpg", "empty.png", "2020/notes.jpg"}
    assert "empty file" in errors["empty.png"] and "not an image" in errors["2020/notes.jpg"]
    assert all(r["captions"][0]["generated_text"] and r["model"] == "best" and len(r["version"]) == 12
               for name, r in got.items() if name not in errors)

    before = output.read_bytes()
    again = run(photos, output, model_dir)
    assert again.returncode == 0 and "0 images captioned, 0 unreadable" in again.stderr
    assert "9 already done" in again.stderr
    assert output.read_bytes() == before


@pytest.mark.slow
@pytest.mark.cli
def test_refuses_to_resume_an_output_from_another_model(library, model_dir, tmp_path):
    photos, reference = library
    output = tmp_path / "captions.jsonl"
    line = dict(next(r for r in reference.values()), version="0123456789ab")
    output.write_text(json.dumps(line) + "\n")
    result = run(photos, output, model_dir)
    assert result.returncode == 2 and str(output) in result.stderr and "0123456789ab" in result.stderr
    assert output.read_text() == json.dumps(line) + "\n"  # untouched

    output.write_text(json.dumps(line)[:-1] + "\n" + json.dumps(line) + "\n")
    result = run(photos, output, model_dir)
    assert result.returncode == 2 and f"{output}, line 1" in result.stderr


@pytest.mark.slow
@pytest.mark.cli
def test_refuses_to_resume_an_output_decoded_with_other_options(library, model_dir, tmp_path):
    photos, reference = library
    line = next(r for r in reference.values())
    assert line["decoding"]["beam_size"] == 2  # the model's default, which the reference run used
    output = tmp_path / "captions.jsonl"
    output.write_text(json.dumps(line) + "\n")
    result = run(photos, output, model_dir, "--beam-size", "3")
    assert result.returncode == 2 and str(output) in result.stderr and "beam_size 2 -> 3" in result.stderr
    assert output.read_text() == json.dumps(line) + "\n"  # untouched
    result = run(photos, output, model_dir)  # the same options as before: goes on
    assert result.returncode == 0, result.stderr
    assert len(output.read_text().splitlines()) == len(reference)


@pytest.mark.slow
@pytest.mark.cli
def test_jsonl_output_takes_one_library_folder(model_dir, tmp_path):
    photo = ROOT / "examples" / "photos" / "chelsea.jpg"
    result = run(photo, tmp_path / "out.jsonl", model_dir)
    assert result.returncode != 0 and "one library folder" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_merge_after_a_kill_between_rename_and_cleanup_adds_nothing_twice(tmp_path):
    output = tmp_path / "c.jsonl"
    a, b, c = ({"file": name, "captions": []} for name in "abc")
    output.write_text(f"{json.dumps(a)}\n{json.dumps(b)}\n{{\"file\": \"hal")  # b already merged, then a cut line
    bulk.part_path(output, 1, 2).write_text(f"{json.dumps(b)}\n{json.dumps(c)}\n")
    assert bulk.merge_parts(output) == 1
    assert [r["file"] for r in records(output)] == ["a", "b", "c"]
    assert bulk.existing_parts(output) == []


@pytest.mark.slow
@pytest.mark.cli
def test_torchrun_shards_resumes_parts_and_merges(library, model_dir, tmp_path):
    """Two CPU processes split the library by path hash; each resumes its part; rank 0 merges, and also
    takes in a part left by an earlier run with three processes."""
    photos, reference = library
    output = tmp_path / "captions.jsonl"
    kept = {}
    for rank, world in [(1, 2), (2, 3)]:  # one line in this run's part of rank 1, one in an old 3-process part
        name = next(n for n in reference if bulk.rank_of(bulk.path_hash(n), world) == rank and n not in kept)
        kept[name] = dict(reference[name], captions=[{"generated_text": f"kept {rank} of {world}", "score": -1.0}])
        cut = '{"file": "' + next(n for n in reference if bulk.rank_of(bulk.path_hash(n), world) == rank
                                   and n not in kept)  # a half-written line
        bulk.part_path(output, rank, world).write_text(json.dumps(kept[name]) + "\n" + cut)
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, "-m",
           *caption_cmd(photos, output, model_dir)[2:]]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    shares = [int(result.stderr.split(f"rank {r} of 2: ")[1].split(" images captioned")[0]) for r in (0, 1)]
    assert sum(shares) == len(reference) - 2 and min(shares) > 100  # disjoint, about half each
    assert bulk.existing_parts(output) == []
    got = by_file(output)
    for name, record in kept.items():
        assert got[name]["captions"] == record["captions"]
        got[name] = reference[name]
    assert_same_captions(got, reference)
