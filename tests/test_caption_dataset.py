"""Bulk captioning: sources, atomic shards, the local and Ray engines against `clipcap caption`, kill and resume."""
import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from clipcap.bulk.run import BulkConfig, caption_dataset
from clipcap.bulk.shards import ShardWriter, done_ids, shard_paths
from clipcap.bulk.sources import SourceError, list_images, read_bytes
from clipcap.captioner import Captioner
from clipcap.cli import main
from conftest import png_bytes, random_images

REPO = Path(__file__).resolve().parents[1]
GOOD = 200  # generated images; a few bad entries are added beside them
BATCH = "32"  # large batches keep the suite fast; batched decoding equals one-by-one (test_decoding)
BAD = {"a/broken.png": "not a recognised image", "b/truncated.png": "corrupt or truncated image"}


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """images/{a,b}/ (PNG and JPEG, two bad files), a list file with a missing and a repeated entry,
    and the same images as two WebDataset tar shards (image + a .txt sidecar per key)."""
    root = tmp_path_factory.mktemp("collection")
    good = []
    for i, image in enumerate(random_images(GOOD, seed=7, size=32)):
        relative = f"a/img{i:03d}.png" if i % 2 else f"b/img{i:03d}.jpg"
        path = root / "images" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        good.append(relative)
    (root / "images" / "a" / "broken.png").write_bytes(b"not an image at all")
    (root / "images" / "b" / "truncated.png").write_bytes(png_bytes(random_images(1, seed=8)[0])[:200])
    (root / "list.txt").write_text("\n".join([f"images/{p}" for p in good] + ["images/missing.png", f"images/{good[0]}"]))
    (root / "shards").mkdir()
    members = sorted(good + list(BAD))
    half = len(members) // 2
    for number, part in enumerate((members[:half], members[half:])):
        with tarfile.open(root / "shards" / f"shard-{number:03d}.tar", "w") as tar:
            for relative in part:
                tar.add(root / "images" / relative, arcname=relative)
                sidecar = tarfile.TarInfo(relative.rsplit(".", 1)[0] + ".txt")  # same key, not an image
                sidecar.size = 4
                tar.addfile(sidecar, io.BytesIO(b"text"))
    return root, good


@pytest.fixture(scope="module")
def reference(collection, tiny_bundle):
    """relative path -> (caption, token_ids) from `clipcap caption` on the good images."""
    root, good = collection
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["caption", str(tiny_bundle), *[str(root / "images" / p) for p in good], "--json",
                     "--batch-size", BATCH])
    assert code == 0
    return {str(Path(r["image"]).relative_to(root / "images")): (r["caption"], r["token_ids"])
            for r in json.loads(stdout.getvalue())}


def read_rows(out: Path) -> list[dict]:
    return [row for path in shard_paths(out) for row in pq.read_table(path).to_pylist()]


def check_against_reference(rows: list[dict], reference: dict, relative_of, bad: dict) -> None:
    """Each id once; good images captioned exactly as `clipcap caption` does; bad ones recorded."""
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids))
    assert sorted(relative_of(i) for i in ids) == sorted(list(reference) + list(bad))
    for row in rows:
        relative = relative_of(row["id"])
        if relative in bad:
            assert row["caption"] is None and row["token_ids"] is None
            assert bad[relative] in row["error"]
        else:
            assert row["error"] is None
            assert (row["caption"], row["token_ids"]) == reference[relative], relative


# -- sources and shards, no model ---------------------------------------------------------------------


def test_sources_folder_list_and_tar(collection, tmp_path):
    root, good = collection
    folder = list_images(root / "images").refs
    assert [ref.id for ref in folder] == sorted(good + list(BAD))
    listed = list_images(root / "list.txt").refs
    assert [ref.id for ref in listed] == [f"images/{p}" for p in good] + ["images/missing.png"]  # repeat dropped
    tars = list_images(root / "shards").refs
    assert len(tars) == len(folder)  # the .txt sidecars are not images
    for ref in tars:
        shard, key = ref.id.split("/", 1)
        relative = next(p for p in good + list(BAD) if p.rsplit(".", 1)[0] == key)
        assert shard.startswith("shard-") and read_bytes(ref) == (root / "images" / relative).read_bytes()
    for kind, write in (("csv", lambda p: p.write_text("image,label\nimages/a/img001.png,x\n")),
                        ("parquet", lambda p: pq.write_table(pa.table({"path": ["images/a/img001.png"]}), p))):
        path = root / f"list.{kind}"
        write(path)
        assert [(r.id, r.path) for r in list_images(path).refs] == [("images/a/img001.png", str(root / "images/a/img001.png"))]
    (tmp_path / "no-column.csv").write_text("url\nhttp://example.com/x.png\n")
    with pytest.raises(SourceError, match="no path column"):
        list_images(tmp_path / "no-column.csv")
    with pytest.raises(SourceError, match="no such file"):
        list_images(tmp_path / "absent")


def test_folder_walk_follows_the_accepted_formats_and_counts_what_it_skips(tmp_path):
    """Every accepted format's extensions are walked (HEIC, AVIF, TIFF, GIF ... as JPEG); --formats narrows
    the walk; the files left out are counted by extension, never silently dropped."""
    from clipcap.image_formats import FORMATS

    names = [f"{fmt.lower()}{i}{ext.upper() if i % 2 else ext}" for fmt, spec in FORMATS.items()
             for i, ext in enumerate(spec.extensions)]
    for name in names + ["notes.txt", "meta.json", "b.txt", "README"]:
        (tmp_path / name).write_bytes(b"x")
    listing = list_images(tmp_path)
    assert sorted(ref.id for ref in listing.refs) == sorted(names)
    assert listing.skipped == {".json": 1, ".txt": 2, "README": 1}
    heic = list_images(tmp_path, ("HEIF",))
    assert sorted(ref.id for ref in heic.refs) == sorted(n for n in names if n.startswith("heif"))
    assert sum(heic.skipped.values()) == len(names) + 4 - len(heic.refs)


def test_caption_dataset_reads_gif_tiff_heic_folders_and_reports_skips(tiny_bundle, tmp_path, capsys):
    pillow_heif = pytest.importorskip("pillow_heif")
    folder = tmp_path / "photos"
    folder.mkdir()
    images = random_images(3, seed=3, size=32)
    images[0].save(folder / "a.gif")
    images[1].save(folder / "b.TIFF")
    pillow_heif.from_pillow(images[2]).save(folder / "c.heic")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(["caption-dataset", str(tiny_bundle), str(folder), "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "3 of 3 images" in summary and "1 files skipped, not of the accepted --formats (1 .txt)" in summary
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["skipped_files"] == {".txt": 1} and manifest["counts"]["failed"] == 0
    assert sorted(row["id"] for row in read_rows(out)) == ["a.gif", "b.TIFF", "c.heic"]


@settings(max_examples=25, deadline=None)
@given(batches=st.lists(st.integers(0, 9), max_size=12), shard_size=st.integers(1, 7))
def test_shard_writer_keeps_every_row_once_in_order(tmp_path_factory, batches, shard_size):
    out = tmp_path_factory.mktemp("shards")
    (out / "part-00003.parquet.tmp").write_bytes(b"half a shard from a killed run")
    writer = ShardWriter(out, shard_size, embeddings=False)
    ids = [f"img{i}" for i in range(sum(batches))]
    rows = iter({"id": i, "path": i, "caption": "c", "token_ids": [1], "error": None} for i in ids)
    added = 0
    for size in batches:
        writer.add([next(rows) for _ in range(size)])
        added += size
        assert len(shard_paths(out)) == added // shard_size  # a shard is written the moment it is full
    writer.close()
    assert done_ids(out) == set(ids)  # the stale .tmp never counts, and is removed
    assert not list(out.glob("*.tmp"))
    assert [row["id"] for row in read_rows(out)] == ids
    assert all(pq.read_metadata(p).num_rows <= shard_size for p in shard_paths(out))


# -- the engines against `clipcap caption` ------------------------------------------------------------


def test_local_folder_matches_caption_command(collection, reference, tiny_bundle, tmp_path, capsys):
    root, _ = collection
    out = tmp_path / "out"
    assert main(["caption-dataset", str(tiny_bundle), str(root / "images"), "--out", str(out),
                 "--shard-size", "64", "--batch-size", BATCH, "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    check_against_reference(read_rows(out), reference, lambda i: i, BAD)
    assert manifest["counts"]["rows"] == GOOD + len(BAD) and manifest["counts"]["failed"] == len(BAD)
    assert manifest["shards"] == [p.name for p in shard_paths(out)] and len(manifest["shards"]) == 4
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_local_list_with_embeddings(collection, reference, tiny_bundle, tmp_path):
    root, good = collection
    manifest = caption_dataset(BulkConfig(bundle=str(tiny_bundle), source=str(root / "list.txt"),
                                          out=str(tmp_path / "out"), embeddings=True, batch_size=int(BATCH),
                                          progress=False))
    rows = read_rows(tmp_path / "out")
    check_against_reference(rows, reference, lambda i: i.removeprefix("images/"), {"missing.png": "file not found"})
    assert manifest["counts"]["failed"] == 1
    captioner = Captioner.from_path(tiny_bundle)
    by_id = {row["id"]: row for row in rows}
    for relative in good[:4]:
        from clipcap.images import load_image_file

        pixels = captioner.preprocess([load_image_file(root / "images" / relative)])
        expected = captioner.runtime.encode_image(pixels)[0]
        # Same float32 computation in another batch composition: only summation order differs.
        assert by_id[f"images/{relative}"]["embedding"] == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-5)
    assert by_id["images/missing.png"]["embedding"] is None


def test_ray_engine_resumes_a_partial_output_of_tars(collection, reference, tiny_bundle, tmp_path):
    """Local run, then half its shards deleted; Ray (embedded, 2 actors) captions exactly what is missing."""
    pytest.importorskip("ray")
    root, _ = collection
    out = tmp_path / "out"

    def relative_of(image_id):
        key = image_id.split("/", 1)[1]
        return next(p for p in list(reference) + list(BAD) if p.rsplit(".", 1)[0] == key)

    config = BulkConfig(bundle=str(tiny_bundle), source=str(root / "shards"), out=str(out), shard_size=60,
                        batch_size=int(BATCH), progress=False)
    caption_dataset(config)
    for path in shard_paths(out)[1:]:
        path.unlink()
    kept = len(read_rows(out))
    manifest = caption_dataset(BulkConfig(**{**vars(config), "engine": "ray", "actors": 2}))
    check_against_reference(read_rows(out), reference, relative_of, BAD)
    assert manifest["counts"]["this_run"]["skipped_done"] == kept == 60
    assert manifest["counts"]["this_run"]["captioned"] + manifest["counts"]["this_run"]["failed"] == GOOD + len(BAD) - 60


def test_local_resume_of_tars_is_keyed_on_the_id(collection, reference, tiny_bundle, tmp_path):
    """Every image of a tar shares its `path` (the shard): resume must match on `id` (tar/key) to caption
    exactly the rows whose shards were lost, no more, no fewer. The local engine: no Ray needed."""
    root, _ = collection
    out = tmp_path / "out"
    config = BulkConfig(bundle=str(tiny_bundle), source=str(root / "shards"), out=str(out), shard_size=60,
                        batch_size=int(BATCH), progress=False)
    caption_dataset(config)
    for path in shard_paths(out)[1:]:
        path.unlink()
    kept = {row["id"] for row in read_rows(out)}
    manifest = caption_dataset(config)
    rows = read_rows(out)
    assert len(kept) == 60 and manifest["counts"]["this_run"]["skipped_done"] == 60
    assert len(rows) == len({row["id"] for row in rows}) == GOOD + len(BAD)
    this_run = manifest["counts"]["this_run"]
    assert this_run["captioned"] + this_run["failed"] == GOOD + len(BAD) - 60


# -- a real kill, then resume -------------------------------------------------------------------------


def _blocked_at_a_fifo(collection, tiny_bundle, tmp_path, output):
    """caption-dataset over a list holding a FIFO at position 150, shards of 20, batches of 10, started and waited
    for until its 7 full shards are written: the run then reads at (or just before) the FIFO, which never ends.
    Returns (fifo, out, command, env, process); `output` is the process's stdout and stderr (DEVNULL or PIPE)."""
    root, good = collection
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    listed = [str(root / "images" / p) for p in good]
    (tmp_path / "list.txt").write_text("\n".join(listed[:150] + [str(fifo)] + listed[150:]))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "clipcap.cli", "caption-dataset", str(tiny_bundle), str(tmp_path / "list.txt"),
               "--out", str(out), "--shard-size", "20", "--batch-size", "10"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, stdout=output, stderr=output, text=True)
    deadline = time.monotonic() + 600  # a safety net only: the run blocks at the FIFO, it cannot finish
    while len(shard_paths(out)) < 7 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return fifo, out, command, env, process


def test_sigkill_then_resume_captions_only_what_is_missing(collection, reference, tiny_bundle, tmp_path):
    """The list holds a FIFO at position 150: the run blocks there for ever (reading the batch 150..159),
    after exactly 7 full shards of 20 (rows 0..139; rows 140..149 are captioned but only buffered). It is killed there, the FIFO is
    replaced by an image, and the same command finishes the job."""
    root, _ = collection
    fifo, out, command, env, process = _blocked_at_a_fifo(collection, tiny_bundle, tmp_path, subprocess.DEVNULL)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shard_paths(out)}
    assert len(before) == 7

    fifo.unlink()
    image = random_images(1, seed=99, size=32)[0]
    image.save(fifo)
    (out / "part-00007.parquet.tmp").write_bytes(b"PAR1 half written")  # as if killed mid-write
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr

    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shard_paths(out)}
    assert {name: after[name] for name in before} == before  # done shards untouched
    assert not list(out.glob("*.tmp"))
    expected = dict(reference)
    expected[fifo.name] = (lambda c: (c.caption, c.token_ids))(Captioner.from_path(tiny_bundle).caption_images([image]).captions[0])
    check_against_reference(read_rows(out), expected, lambda i: Path(i).name if i == str(fifo)
                            else str(Path(i).relative_to(root / "images")), {})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["this_run"] == {"skipped_done": 140, "captioned": GOOD + 1 - 140, "failed": 0}


def test_ctrl_c_stops_with_one_line_and_an_interrupted_manifest(collection, tiny_bundle, tmp_path):
    """SIGINT once 7 shards of 20 are written, the run then at or just before a FIFO (position 150): exit 130, no
    traceback, the rows captioned so far all written, the manifest's status 'interrupted'."""
    _, out, _, _, process = _blocked_at_a_fifo(collection, tiny_bundle, tmp_path, subprocess.PIPE)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stdout == ""
    # 150 when the signal finds the run blocked at the FIFO; 140 when it comes while the batch before the FIFO is
    # still being captioned (that batch is dropped, never half written). Either way every kept row is on disk.
    kept = len(read_rows(out))
    assert kept in (140, 150)
    assert stderr.rstrip().splitlines()[-1] == (f"interrupted: {kept} of {GOOD + 1} images kept in {out} ({kept} this "
                                                "run); the same command resumes")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["counts"]["rows"] == kept


# -- refusals: nothing written --------------------------------------------------------------------------


def test_resume_with_other_settings_is_refused(collection, tiny_bundle, tmp_path, capsys):
    root, good = collection
    small = tmp_path / "small"
    small.mkdir()
    for relative in good[:3]:
        (small / Path(relative).name).write_bytes((root / "images" / relative).read_bytes())
    out = tmp_path / "out"
    assert main(["caption-dataset", str(tiny_bundle), str(small), "--out", str(out)]) == 0
    before = [p.read_bytes() for p in shard_paths(out)]
    assert main(["caption-dataset", str(tiny_bundle), str(small), "--out", str(out), "--decoding", "beam"]) == 2
    assert "other settings (options.strategy: 'greedy' then, 'beam' now)" in capsys.readouterr().err
    assert [p.read_bytes() for p in shard_paths(out)] == before


def test_embeddings_from_every_bundle_kind_through_the_cli(collection, tiny_bundle, tiny_export, tmp_path):
    """No --backend typed: a model bundle (torch) and an export bundle (onnxruntime) both store embeddings,
    equal within the encoder graph's parity bound, with the same captions."""
    from clipcap.formats.graph_specs import encoder_spec
    from clipcap.formats.model_bundle import load_config

    root, good = collection
    small = tmp_path / "small"
    small.mkdir()
    for relative in good[:5]:
        (small / Path(relative).name).write_bytes((root / "images" / relative).read_bytes())
    rows = {}
    for name, bundle in (("model", tiny_bundle), ("export", tiny_export)):
        assert main(["caption-dataset", str(bundle), str(small), "--out", str(tmp_path / name), "--embeddings"]) == 0
        rows[name] = {row["id"]: row for row in read_rows(tmp_path / name)}
    assert rows["model"].keys() == rows["export"].keys() and len(rows["model"]) == 5
    atol = encoder_spec(load_config(tiny_bundle)).atol
    for image_id, expected in rows["model"].items():
        got = rows["export"][image_id]
        assert got["error"] is None and got["token_ids"] == expected["token_ids"]
        assert got["embedding"] == pytest.approx(expected["embedding"], abs=atol)
