"""`specwhisper transcribe-many` on a local Ray instance of 2 CPUs (specwhisper.cluster).

Through Ray, the dev clips get exactly the outputs the single-process CLI writes; bad files fail alone with
their error in the results table; a job killed halfway and run again does only the files it had not
finished; the table keeps one row per file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import AUDIO, REPO, read_manifest

from specwhisper import cli
from specwhisper.cluster import (RESULTS_TABLE, AudioFile, JobError, Transcriber, WorkerSettings, find_audio,
                                 is_done, plan_outputs, read_results, transcribe_files)

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")

FORMATS = ("txt", "srt", "vtt", "tsv")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance of 2 CPUs for the module; transcribe_files joins it instead of starting its own."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


def dev_clips() -> list[str]:
    return [row["path"] for row in read_manifest("dev")]


def table_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / RESULTS_TABLE).read_text().splitlines()]


def test_dev_clips_through_ray_equal_the_single_process_cli(base_model, tmp_path):
    """Base with its default assistant (auto): every output file of every dev clip, byte for byte (the json's
    text, segments and tokens: its timings differ). The Ray job is the command, in its own process, starting
    its own Ray instance (2 workers of 1 thread on 2 cores)."""
    clips = dev_clips()
    single, many = tmp_path / "single", tmp_path / "many"
    assert cli.main(["transcribe", *clips, "--output_dir", str(single)]) == 0
    done = run_cli("transcribe-many", str(AUDIO / "dev"), "--output_dir", str(many))
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("specwhisper: 40 files (0.08 h of audio) in ")
    for clip in clips:
        stem = Path(clip).stem
        for name in FORMATS:
            assert (many / f"{stem}.{name}").read_bytes() == (single / f"{stem}.{name}").read_bytes(), (stem, name)
        ours, theirs = (json.loads((folder / f"{stem}.json").read_text()) for folder in (many, single))
        assert (ours["text"], ours["segments"], ours["tokens"]) == (theirs["text"], theirs["segments"],
                                                                     theirs["tokens"])
    rows = table_rows(many)
    assert sorted(row["file"] for row in rows) == sorted(clips)  # one row per file
    assert all(row["status"] == "ok" and row["error"] is None for row in rows)
    assert {Path(row["file"]).stem: row["text"] for row in rows} == {
        Path(c).stem: json.loads((single / f"{Path(c).stem}.json").read_text())["text"] for c in clips}
    assert len({row["worker"] for row in rows}) == 2  # both actors took files
    assert sum(row["audio_seconds"] for row in rows) == pytest.approx(
        sum(float(row["seconds"]) for row in read_manifest("dev")), abs=0.1)


@pytest.fixture
def small_job(tmp_path) -> Path:
    """Three dev clips, a corrupt MP3 and an empty WAV in one folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    for clip in dev_clips()[:3]:
        (folder / Path(clip).name).symlink_to(clip)
    (folder / "corrupt.mp3").write_bytes(Path(dev_clips()[0]).read_bytes()[5000:9000])
    (folder / "empty.wav").write_bytes(b"")
    return folder


def test_bad_files_fail_alone(local_ray, small_job, tmp_path):
    out = tmp_path / "out"
    done = run_cli("transcribe-many", str(small_job), "-o", str(out), "--model", "tiny.en")
    assert done.returncode == cli.EXIT_BAD_INPUT
    assert "Traceback" not in done.stderr
    rows = {Path(row["file"]).name: row for row in table_rows(out)}
    assert len(rows) == 5
    assert rows["empty.wav"]["status"] == "failed" and "empty" in rows["empty.wav"]["error"]
    assert rows["corrupt.mp3"]["status"] == "failed" and "could not decode" in rows["corrupt.mp3"]["error"]
    assert f"specwhisper: failed: {small_job / 'empty.wav'}: cannot load audio" in done.stderr
    good = [row for row in rows.values() if row["status"] == "ok"]
    assert len(good) == 3 and all(row["text"] and row["language"] == "en" for row in good)
    for row in good:
        assert sorted(row["outputs"]) == sorted(f"{Path(row['file']).stem}.{f}" for f in (*FORMATS, "json"))
        assert all((out / name).is_file() for name in row["outputs"])
    assert "specwhisper: 5 files" in done.stderr and "; 2 failed;" in done.stderr

    # Run again: nothing to do, and the standing failures keep the exit status non-zero.
    done = run_cli("transcribe-many", str(small_job), "-o", str(out), "--model", "tiny.en")
    assert done.returncode == cli.EXIT_BAD_INPUT
    assert "nothing to do: all 5 files were done before (2 of them failed)" in done.stderr

    # --retry-failed tries the two again (and they fail again); a good file whose output is gone is redone.
    (out / f"{Path(dev_clips()[1]).stem}.srt").unlink()
    summary = transcribe_files([small_job], out, WorkerSettings(model="tiny.en"), retry_failed=True, progress=False,
                               log=lambda line: None)
    assert (summary.succeeded, summary.failed, summary.skipped) == (1, 2, 2)
    assert len(table_rows(out)) == 5  # still one row per file

    # Files in batches of 2 (--batch_size 2): the same transcripts, the same failures.
    batched = tmp_path / "batched"
    transcribe_files([small_job], batched, WorkerSettings(model="tiny.en", formats=("txt",),
                                                          options={"batch_size": 2}),
                     progress=False, log=lambda line: None)
    batch_rows = {Path(row["file"]).name: row for row in table_rows(batched)}
    assert {name: row["status"] for name, row in batch_rows.items()} == {n: r["status"] for n, r in rows.items()}
    assert sorted(row.get("batch_files", 1) for row in batch_rows.values()) == [1, 2, 2, 2, 2]  # 5 files: 2 + 2 + 1
    for row in good:
        name = f"{Path(row['file']).stem}.txt"
        assert (batched / name).read_text() == (out / name).read_text()


def test_killed_job_resumes_with_the_missing_files_only(local_ray, tmp_path):
    """A job in its own process (its own Ray instance), killed once two files are done; the same job again
    transcribes only the rest, and keeps the rows it had."""
    clips = dev_clips()[:12]
    manifest = tmp_path / "files.txt"
    manifest.write_text("# twelve dev clips\n" + "\n".join(clips) + "\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "specwhisper", "transcribe-many", str(manifest), "-o", str(out),
               "--model", "tiny.en", "--workers", "2"]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    table = out / RESULTS_TABLE
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and job.poll() is None:
            if table.is_file() and len(table.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and the Ray instance it started
        job.wait()
    before = read_results(table)
    assert 2 <= len(before) < len(clips), "the job was not caught halfway"

    summary = transcribe_files([manifest], out, WorkerSettings(model="tiny.en"), progress=False)
    assert summary.skipped == len(before)
    assert summary.succeeded == len(clips) - len(before) and summary.failed == 0
    after = read_results(table)
    assert sorted(after) == sorted(clips) and len(table_rows(out)) == len(clips)
    for file, row in before.items():
        assert after[file] == row  # not redone
    assert all(after[c]["status"] == "ok" for c in clips)


def test_a_cut_line_does_not_swallow_the_next_row(local_ray, tmp_path):
    folder = small_clip_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / RESULTS_TABLE).write_text('{"file": "/cut/short.wav", "sta')  # a killed job's last write
    summary = transcribe_files([folder], out, WorkerSettings(model="tiny.en", formats=("txt",)), progress=False)
    assert summary.succeeded == 1
    assert [row["file"] for row in table_rows(out)] == [str(folder / "clip.flac")]  # every line whole


class CrashingTranscriber(Transcriber):
    """Kills its own process on a file named crash*: what a segfault in a decoder or the OOM killer does."""

    def transcribe(self, files):
        if any(Path(f.path).name.startswith("crash") for f in files):
            os._exit(1)
        return super().transcribe(files)


def test_a_file_that_kills_its_worker_fails_alone(local_ray, tmp_path):
    """Tried once more on a restarted worker, then recorded as failed; the other files go on."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module
    folder = tmp_path / "in"
    folder.mkdir()
    for name, clip in zip(("a.flac", "crash.flac", "b.flac"), dev_clips()):
        (folder / name).symlink_to(clip)
    out = tmp_path / "out"
    failed = []
    summary = transcribe_files([folder], out, WorkerSettings(model="tiny.en", formats=("txt",)), progress=False,
                               log=failed.append, worker_class=CrashingTranscriber)
    assert (summary.succeeded, summary.failed) == (2, 1)
    rows = {Path(row["file"]).name: row for row in table_rows(out)}
    assert rows["crash.flac"]["status"] == "failed" and "its worker died" in rows["crash.flac"]["error"]
    assert rows["a.flac"]["status"] == rows["b.flac"]["status"] == "ok"
    assert failed == [f"specwhisper: failed: {folder / 'crash.flac'}: {rows['crash.flac']['error']}"]


def test_uris_are_read_through_pyarrow(local_ray, tmp_path):
    """file:// URIs take the path s3:// and gs:// take: listed and read by pyarrow's filesystems, copied to a
    scratch file, transcribed as the local files are; a bad one fails alone, with the URI in its error."""
    folder = tmp_path / "in"
    folder.mkdir()
    for clip in dev_clips()[:2]:
        (folder / Path(clip).name).write_bytes(Path(clip).read_bytes())
    (folder / "corrupt.mp3").write_bytes(Path(dev_clips()[0]).read_bytes()[5000:9000])
    manifest = tmp_path / "more.txt"
    manifest.write_text(f"file://{tmp_path}/gone.wav\n")
    settings = WorkerSettings(model="tiny.en", formats=("txt",))
    local, remote = tmp_path / "local", tmp_path / "remote"
    transcribe_files([folder], local, settings, progress=False, log=lambda line: None)
    summary = transcribe_files([f"file://{folder}", manifest], remote, settings, progress=False, log=lambda line: None)
    assert (summary.succeeded, summary.failed) == (2, 2)
    rows = {row["file"]: row for row in table_rows(remote)}
    assert sorted(rows) == sorted([f"file://{folder}/{Path(c).name}" for c in dev_clips()[:2]]
                                  + [f"file://{folder}/corrupt.mp3", f"file://{tmp_path}/gone.wav"])
    corrupt, gone = rows[f"file://{folder}/corrupt.mp3"], rows[f"file://{tmp_path}/gone.wav"]
    assert corrupt["status"] == "failed" and f"cannot load audio 'file://{folder}/corrupt.mp3'" in corrupt["error"]
    assert gone["status"] == "failed" and gone["error"].startswith(f"cannot read file://{tmp_path}/gone.wav: ")
    for clip in dev_clips()[:2]:
        name = f"{Path(clip).stem}.txt"
        assert (remote / "in" / name).read_text() == (local / name).read_text()
    assert transcribe_files([f"file://{folder}", manifest], remote, settings, progress=False).skipped == 4
    with pytest.raises(JobError, match="no such folder or audio file"):
        find_audio([f"file://{tmp_path}/nowhere"])


class BrokenTranscriber(Transcriber):
    """A worker that cannot start (no memory for its model, say)."""

    def __init__(self, settings, output_dir):
        raise RuntimeError("no memory left for the model")


def test_workers_that_cannot_start_end_the_job_in_one_line(local_ray, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with pytest.raises(JobError, match="the Ray job failed after 0 files: RuntimeError: no memory left for the "
                                       "model; the results table keeps them"):
        transcribe_files([small_clip_folder(tmp_path)], tmp_path / "out", WorkerSettings(model="tiny.en"),
                         progress=False, worker_class=BrokenTranscriber)


def test_find_audio_reads_folders_manifests_and_files(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/x.wav", "a/deep/y.FLAC", "a/notes.txt", "a/deep/z.mp3"):
        (tmp_path / name).write_bytes(b"")
    manifest = tmp_path / "list.txt"
    manifest.write_text("# comment\na/x.wav\n\n  a/deep/z.mp3  # the last\n/elsewhere/missing.wav\n")
    found = find_audio([tmp_path / "a", manifest, tmp_path / "a" / "x.wav"])
    assert found == [str(tmp_path / "a/deep/y.FLAC"), str(tmp_path / "a/deep/z.mp3"), str(tmp_path / "a/x.wav"),
                     "/elsewhere/missing.wav"]  # each once; a missing file fails alone, later
    with pytest.raises(JobError, match="no such folder"):
        find_audio([tmp_path / "nowhere"])


def test_outputs_mirror_folders_and_clashes_are_refused():
    files = plan_outputs(["/data/a/x.wav", "/data/b/x.wav", "/data/b/c/y.mp3"])
    assert [f.output_stem for f in files] == ["a/x", "b/x", "b/c/y"]
    with pytest.raises(JobError, match="same output files"):
        plan_outputs(["/data/a/x.wav", "/data/a/x.mp3"])


def test_results_table_tolerates_a_cut_line_and_changed_files(tmp_path):
    audio = tmp_path / "x.wav"
    audio.write_bytes(b"RIFF")
    file = AudioFile(str(audio), "x")
    stat = audio.stat()
    row = {"file": str(audio), "status": "ok", "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    table = tmp_path / RESULTS_TABLE
    table.write_text(json.dumps({**row, "status": "failed"}) + "\n" + json.dumps(row) + "\n" + '{"file": "/y.wa')
    assert read_results(table) == {str(audio): row}  # the last row of each file; the cut line ignored
    assert not is_done(row, file, tmp_path, ["txt"])  # its output is missing
    (tmp_path / "x.txt").write_text("hi")
    assert is_done(row, file, tmp_path, ["txt"])
    assert not is_done({**row, "status": "failed"}, file, tmp_path, ["txt"], retry_failed=True)
    assert is_done({**row, "status": "failed"}, file, tmp_path, ["txt"])
    audio.write_bytes(b"RIFF and more")  # the file changed since: redo it
    assert not is_done(row, file, tmp_path, ["txt"])


def test_gpus_the_cluster_lacks_are_refused(local_ray, tmp_path):
    with pytest.raises(JobError, match="2 workers of 1 GPU need 2 GPUs; the Ray cluster has 0"):
        transcribe_files([small_clip_folder(tmp_path), AUDIO / "dev" / "jfk.flac"], tmp_path / "o",
                         WorkerSettings(model="tiny.en", gpus=1), workers=2, progress=False)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from specwhisper.cli import main; sys.exit(main())",
                           *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


def test_errors_come_before_ray_starts(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        (["transcribe-many", str(tmp_path / "empty"), "-o", str(tmp_path / "o")], "no audio files in"),
        (["transcribe-many", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")], "no such folder"),
        (["transcribe-many", str(AUDIO / "dev"), "-o", str(tmp_path / "o"), "--model", "no-such-model"],
         "not a folder, a known model name"),
        (["transcribe-many", str(AUDIO / "dev"), "-o", str(tmp_path / "o"), "--device", "tpu"], "tpu"),
        (["transcribe-many", str(AUDIO / "dev"), "-o", str(tmp_path / "o"), "--language", "yue"],
         "language 'yue' is not in this vocabulary"),  # base's; only its tokenizer can tell
    ]
    for args, message in cases:
        done = run_cli(*args)
        assert done.returncode == cli.EXIT_BAD_INPUT, done.stderr
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "o").exists()


def test_without_ray_one_line_names_the_extra(tmp_path):
    """`import ray` made to fail: the job says which extra to install, in one line."""
    code = ("import sys, importlib.abc\n"
            "class NoRay(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'ray' or name.startswith('ray.'): raise ImportError('no ray')\n"
            "sys.meta_path.insert(0, NoRay())\n"
            "from specwhisper.cli import main\n"
            f"sys.exit(main(['transcribe-many', {str(small_clip_folder(tmp_path))!r}, '-o', {str(tmp_path / 'o')!r}, "
            "'--model', 'tiny.en']))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == cli.EXIT_BAD_INPUT
    assert done.stderr.strip() == ("specwhisper: error: transcribe-many runs on Ray, which is not installed: "
                                   "pip install 'specwhisper[ray]'")


def small_clip_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "clip.flac").symlink_to(dev_clips()[0])
    return folder


def test_the_core_package_never_imports_ray():
    code = ("import sys, specwhisper, specwhisper.cli, specwhisper.cluster, specwhisper.transcription\n"
            "specwhisper.cli.build_parser().parse_args(['transcribe-many', 'x', '-o', 'y'])\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
