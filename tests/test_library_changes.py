"""A library that changes under its captions (bulk.py): photos moved, deleted and edited since their lines
(`--prune`, size and mtime in each line), the last line of a file as its caption, and the OS lock that keeps
two runs from writing one output. Captions come from the shipped model on a few small generated photos."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner import bulk, cli

from helpers import ROOT

HOLD = """
import sys, time
from captioner import bulk
with bulk.output_lock(sys.argv[1], command="a test"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def save_photo(path: Path, seed: int, size: tuple[int, int] = (20, 28)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


def caption(library: Path, output: Path, *extra: str) -> int:
    return cli.main(["caption", str(library), "--output", str(output), "--device", "cpu", *extra])


def lines(output: Path) -> list[dict]:
    return [json.loads(text) for text in output.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def library(tmp_path) -> tuple[Path, Path]:
    """Five photos in nested folders, captioned once."""
    root = tmp_path / "photos"
    for i, name in enumerate(["2021/camera.jpg", "2021/beach.png", "2022/cat.jpg", "2022/dog.png", "top.jpg"]):
        save_photo(root / name, i)
    out = tmp_path / "x.jsonl"
    assert caption(root, out) == 0
    return root, out


def test_each_line_records_its_photos_size_and_mtime(library):
    root, out = library
    for record in lines(out):
        stat = (root / record["file"]).stat()
        assert (record["size"], record["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)


def test_moved_deleted_and_edited_photos_with_prune(library, capsys):
    """Moved: the new path is captioned and the old line dropped; deleted: its line dropped; edited (new
    pixels, so a new size and mtime): captioned again, one line left; untouched lines kept byte for byte."""
    root, out = library
    before = {r["file"]: text for r, text in zip(lines(out), out.read_text(encoding="utf-8").splitlines())}
    (root / "2021/camera.jpg").rename(root / "camera-moved.jpg")
    (root / "2022/dog.png").unlink()
    save_photo(root / "2022/cat.jpg", 99, size=(30, 30))
    capsys.readouterr()
    assert caption(root, out, "--prune") == 0
    err = capsys.readouterr().err
    # the moved photo and the edited one captioned; camera.jpg, dog.png and cat.jpg's old line pruned
    assert "2 images captioned" in err and "2 already done" in err and "3 lines pruned (gone or replaced)" in err
    after = lines(out)
    files = [r["file"] for r in after]
    assert sorted(files) == sorted(["2021/beach.png", "2022/cat.jpg", "camera-moved.jpg", "top.jpg"])
    texts = dict(zip(files, out.read_text(encoding="utf-8").splitlines()))
    assert texts["2021/beach.png"] == before["2021/beach.png"] and texts["top.jpg"] == before["top.jpg"]
    assert texts["2022/cat.jpg"] != before["2022/cat.jpg"]
    assert next(r for r in after if r["file"] == "2022/cat.jpg")["size"] == (root / "2022/cat.jpg").stat().st_size

    capsys.readouterr()
    assert caption(root, out, "--prune") == 0  # nothing left to do
    assert "0 images captioned" in capsys.readouterr().err and lines(out) == after


def test_an_edited_photo_gets_a_new_line_and_readers_take_the_last(library, capsys):
    """Without --prune an edited photo's new line is appended; `last_lines` gives each file once, the edited
    one at its new line; touching the mtime alone also counts as an edit."""
    root, out = library
    save_photo(root / "top.jpg", 42, size=(28, 20))
    old = (root / "2021/beach.png").stat().st_mtime_ns
    os.utime(root / "2021/beach.png", ns=(old + 10**9, old + 10**9))
    capsys.readouterr()
    assert caption(root, out) == 0
    assert "2 images captioned" in capsys.readouterr().err
    everything = lines(out)
    assert len(everything) == 7
    latest = [record for _, _, record in bulk.last_lines(out)]
    assert sorted(r["file"] for r in latest) == sorted(r["file"] for r in everything[:5])
    # walk order: 2021/beach.png first, top.jpg last; both appended again, and read at their new lines
    assert [r["file"] for r in everything] == ["2021/beach.png", "2021/camera.jpg", "2022/cat.jpg", "2022/dog.png",
                                               "top.jpg", "2021/beach.png", "top.jpg"]
    assert latest == everything[1:4] + everything[5:]
    assert everything[-1]["size"] == (root / "top.jpg").stat().st_size


def test_lines_without_size_and_mtime_count_as_done_by_their_path(library, capsys):
    """An output written before lines recorded size and mtime is resumed, not captioned again."""
    root, out = library
    out.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("size", "mtime_ns")}) + "\n"
                           for r in lines(out)), encoding="utf-8")
    capsys.readouterr()
    assert caption(root, out) == 0
    err = capsys.readouterr().err
    assert "0 images captioned" in err and "5 already done" in err


def test_prune_output_keeps_each_present_files_last_line(tmp_path):
    """prune_output without a model: a gone file's lines, a path out of the library and replaced lines go;
    the rest keep their order and bytes."""
    root = tmp_path / "photos"
    for name in ["a.jpg", "b/c.jpg"]:
        save_photo(root / name, 0)
    (tmp_path / "outside.jpg").write_bytes(b"x")
    rows = [{"file": "a.jpg", "n": 1}, {"file": "gone.jpg", "n": 2}, {"file": "b/c.jpg", "n": 3},
            {"file": "../outside.jpg", "n": 4}, {"file": "a.jpg", "n": 5}, {"file": "gone.jpg", "n": 6}]
    out = tmp_path / "x.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"file": "half')  # a half-written last line
    assert bulk.prune_output(out, root) == 4
    assert lines(out) == [{"file": "b/c.jpg", "n": 3}, {"file": "a.jpg", "n": 5}]


def hold(output: Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(output), str(seconds)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_refuses_at_once_naming_the_holder_and_kill_9_frees_the_lock(library, capsys):
    root, out = library
    save_photo(root / "new.jpg", 7)
    holder = hold(out, 120)
    try:
        capsys.readouterr()
        started = time.perf_counter()
        assert caption(root, out) == 2
        err = capsys.readouterr().err
        assert time.perf_counter() - started < 5  # before the model loads
        assert len(err.strip().splitlines()) == 1
        assert f"x.jsonl is being written by pid {holder.pid} (a test)" in err and "--wait" in err
        assert cli.main(["write-metadata", str(out), "--photos", str(root), "--sidecar"]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert len(lines(out)) == 5  # nothing appended
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert caption(root, out) == 0  # the kernel released the killed holder's lock
    assert len(lines(out)) == 6


def test_wait_waits_for_the_holder_then_runs(library, capsys):
    root, out = library
    save_photo(root / "new.jpg", 7)
    holder = hold(out, 3)
    started = time.perf_counter()
    capsys.readouterr()
    assert caption(root, out, "--wait") == 0
    assert holder.wait(timeout=30) == 0
    err = capsys.readouterr().err
    assert f"waiting for pid {holder.pid}" in err and "1 images captioned" in err
    assert time.perf_counter() - started >= 2.5


def test_output_lock_refuses_a_second_holder_in_the_same_process(tmp_path):
    out = tmp_path / "x.jsonl"
    with bulk.output_lock(out, command="first"):
        assert bulk.lock_holder(out).startswith(f"pid {os.getpid()} (first)")
        with pytest.raises(bulk.OutputLocked, match=f"pid {os.getpid()} \\(first\\)"):
            with bulk.output_lock(out):
                pass
    assert bulk.lock_holder(out) is None
    with bulk.output_lock(out):  # free again once released
        pass


def test_writing_captions_into_the_photos_does_not_make_them_captioned_again(library, capsys):
    """write-metadata changes each photo's size and mtime; it brings their lines up to date, so the next
    `caption` run finds every photo done, while a photo edited afterwards is still caught."""
    pytest.importorskip("pyexiv2")
    root, out = library
    before = {r["file"]: (r["size"], r["mtime_ns"]) for r in lines(out)}
    assert cli.main(["write-metadata", str(out), "--photos", str(root)]) == 0
    for record in lines(out):
        stat = (root / record["file"]).stat()
        assert (record["size"], record["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns) != before[record["file"]]
    save_photo(root / "top.jpg", 5, size=(10, 10))
    capsys.readouterr()
    assert caption(root, out) == 0
    assert "1 images captioned" in capsys.readouterr().err  # top.jpg only
