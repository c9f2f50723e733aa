"""Many files on many machines: `specwhisper transcribe-many` and `transcribe_files`, on Ray Data.

The files become a Ray dataset of paths; `map_batches` streams them through a pool of actors
(`Transcriber`), each of which loads the model and its assistant once, transcribes as
`specwhisper transcribe` does and writes the same output files. The driver appends one JSON line
per finished file to `<output_dir>/results.jsonl` as results arrive, so a job killed halfway keeps
every row it got; run again, it skips the files whose row says done (the file unchanged, its
outputs on disk). Ray is imported here only, inside the functions that need it: the core package
never imports it (the `ray` extra installs it).

Workers read the audio at the path the driver lists and write outputs under `output_dir`: on a
cluster, both must be on a filesystem every machine sees at the same path.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

from .outputs import FORMATS

RESULTS_TABLE = "results.jsonl"
# What the recursive folder search takes as audio (anything else in a folder is left alone).
AUDIO_SUFFIXES = frozenset(".wav .flac .mp3 .m4a .aac .ogg .oga .opus .webm .mp4 .mkv .mov .wma .aiff .aif .amr "
                           ".3gp .caf .avi".split())


class JobError(ValueError):
    """A job that cannot start (no files, clashing outputs, Ray missing) or whose workers cannot: one line."""


@dataclass(frozen=True)
class WorkerSettings:
    """What each worker needs to load the model and transcribe exactly as `specwhisper transcribe` would."""

    model: str = "base"
    assistant: str | None = None  # None: the CLI's default ('auto'); 'none', 'free', a model or draft folder
    draft_length: int | None = None
    device: str | None = None
    dtype: str | None = None
    threads: int = 1  # torch threads per worker (and the CPUs it reserves)
    gpus: float = 0.0  # GPUs each worker reserves (a fraction shares one GPU between workers)
    suppress_tokens: tuple[int, ...] = (-1,)
    formats: tuple[str, ...] = FORMATS
    subtitles: object | None = None  # specwhisper.outputs.SubtitleOptions
    model_dir: str | None = None
    options: dict = field(default_factory=dict)  # `transcribe_many`'s keyword arguments


@dataclass(frozen=True)
class AudioFile:
    path: str  # an absolute path, or a URI
    output_stem: str  # relative to the output folder, without a suffix: outputs are <stem>.<format>


@dataclass
class JobSummary:
    files: int = 0  # in the sources
    skipped: int = 0  # done by an earlier run
    skipped_failed: int = 0  # of those, recorded as failed (tried again with retry_failed)
    succeeded: int = 0  # in this run
    failed: int = 0  # in this run
    audio_seconds: float = 0.0  # of the files transcribed in this run
    wall_seconds: float = 0.0  # this run's, Ray's start and the workers' model loads included
    workers: int = 0
    results_table: str = ""

    @property
    def real_time_factor(self) -> float:
        """Wall time over audio time: 0.1 is ten times faster than real time."""
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else 0.0

    def line(self) -> str:
        failed_before = f" ({self.skipped_failed} of them failed)" if self.skipped_failed else ""
        if self.succeeded + self.failed == 0:
            return (f"nothing to do: all {self.files} files were done before{failed_before}; results in "
                    f"{self.results_table}")
        hours = self.audio_seconds / 3600
        speed = (f"real-time factor {self.real_time_factor:.3f} ({1 / self.real_time_factor:.1f}x real time)"
                 if self.audio_seconds else "no audio transcribed")
        return (f"{self.succeeded + self.failed} files ({hours:.2f} h of audio) in {self.wall_seconds:.1f} s on "
                f"{self.workers} workers: {speed}; {self.failed} failed; {self.skipped} of {self.files} skipped as "
                f"done before{failed_before}; results in {self.results_table}")


def find_audio(sources: Iterable[str | os.PathLike]) -> list[str]:
    """Folders (searched recursively, sorted), manifests (one path per line; '#' starts a comment; relative
    paths are relative to the manifest's folder) and audio files -> absolute paths, each once, in order.
    A source or manifest entry with '://' (s3://bucket/prefix, gs://..., file:///...) is a URI, listed and
    read through pyarrow's filesystems, as Ray Data's readers read them."""
    found: list[str] = []
    for source in sources:
        if is_uri(str(source)):
            found += _list_uri(str(source))
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            found += sorted(os.path.abspath(p) for p in path.rglob("*")
                            if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        elif path.suffix.lower() in AUDIO_SUFFIXES:
            found.append(os.path.abspath(path))  # a missing audio file fails alone, as in `transcribe`
        elif path.is_file():
            found += _read_manifest(path)
        else:
            raise JobError(f"{source}: no such folder, manifest or audio file")
    return list(dict.fromkeys(found))


def is_uri(path: str) -> bool:
    return "://" in path


def _uri_filesystem(uri: str):
    """(pyarrow filesystem, path in it) for a URI; pyarrow comes with the ray extra."""
    try:
        from pyarrow import fs
    except ImportError:
        raise JobError(f"{uri}: URIs are read through pyarrow, which is not installed: "
                       "pip install 'specwhisper[ray]'") from None
    try:
        return fs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as err:  # ArrowInvalid is a ValueError: an unknown scheme, a bad URI
        raise JobError(f"{uri}: {str(err).splitlines()[0]}") from None


def _list_uri(uri: str) -> list[str]:
    from pyarrow import fs

    filesystem, root = _uri_filesystem(uri)
    scheme = uri.split("://", 1)[0]
    info = filesystem.get_file_info(root)
    if info.type == fs.FileType.Directory:
        entries = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
        return sorted(f"{scheme}://{e.path}" for e in entries
                      if e.type == fs.FileType.File and os.path.splitext(e.path)[1].lower() in AUDIO_SUFFIXES)
    if info.type == fs.FileType.File or os.path.splitext(root)[1].lower() in AUDIO_SUFFIXES:
        return [uri]  # a missing audio file fails alone
    raise JobError(f"{uri}: no such folder or audio file")


def _read_manifest(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise JobError(f"{path}: not a readable manifest (a text file with one audio path per line): {err}") from None
    entries = [line.split("#", 1)[0].strip() for line in lines]
    return [entry if is_uri(entry) else os.path.abspath(path.parent / Path(entry).expanduser())
            for entry in entries if entry]


def plan_outputs(paths: list[str]) -> list[AudioFile]:
    """Outputs mirror the files' folders below their common folder; two files that would write the same
    outputs (a.wav and a.mp3 side by side) are refused before any work."""
    if not paths:
        return []
    locations = [_location(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(location) for location in locations])
    files, owners = [], {}
    for path, location in zip(paths, locations):
        stem = os.path.splitext(os.path.relpath(location, root))[0]
        if stem in owners:
            raise JobError(f"{owners[stem]} and {path} would write the same output files ({stem}.*): rename one "
                           "or list them in two jobs")
        owners[stem] = path
        files.append(AudioFile(path, stem))
    return files


def _location(path: str) -> str:
    """Where a file sits, as an absolute path: a URI's path after its scheme (s3://bucket/a.wav -> /bucket/a.wav)."""
    return "/" + path.split("://", 1)[1].lstrip("/") if is_uri(path) else path


def read_results(table: str | os.PathLike) -> dict[str, dict]:
    """The results table -> the last row of each file. A line cut short by a killed job is ignored."""
    rows: dict[str, dict] = {}
    if not os.path.exists(table):
        return rows
    with open(table, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "file" in row:
                rows[row["file"]] = row
    return rows


def is_done(row: dict | None, file: AudioFile, output_dir: str | os.PathLike, formats: Iterable[str],
            retry_failed: bool = False) -> bool:
    """Whether a results row still stands for the file: the same size and modification time, and for a success
    every output asked for on disk (a failure counts as done unless retry_failed)."""
    if row is None or (row.get("size"), row.get("mtime_ns")) != _stat(file.path):
        return False
    if row.get("status") != "ok":
        return not retry_failed
    return all((Path(output_dir) / f"{file.output_stem}.{name}").is_file() for name in formats)


def _stat(path: str) -> tuple[int | None, int | None]:
    """(size, modification time in ns) of a path or URI; None for what cannot be read (or is not kept)."""
    if is_uri(path):
        try:
            from pyarrow import fs

            filesystem, inner = _uri_filesystem(path)
            info = filesystem.get_file_info(inner)
        except (JobError, OSError):
            return None, None
        return (info.size, info.mtime_ns) if info.type == fs.FileType.File else (None, None)
    try:
        stat = os.stat(path)
    except OSError:
        return None, None
    return stat.st_size, stat.st_mtime_ns


def file_row(file: AudioFile) -> dict:
    """The part of a results row that names the file: what resuming compares."""
    size, mtime_ns = _stat(file.path)
    return {"file": file.path, "output_stem": file.output_stem, "size": size, "mtime_ns": mtime_ns,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def failed_row(file: AudioFile, error: str) -> dict:
    return {**file_row(file), "status": "failed", "error": error, "audio_seconds": None, "language": None,
            "outputs": []}


def load_for_settings(settings: WorkerSettings, device: str | None, dtype: str | None):
    """The main model and its drafter, as `specwhisper transcribe` loads them (specwhisper.cli)."""
    from .cli import load_model_and_assistant, use_model_dir

    if settings.model_dir is not None:
        use_model_dir(settings.model_dir)
    options = settings.options
    return load_model_and_assistant(settings.model, settings.assistant, settings.draft_length,
                                    options.get("beam_size"), list(settings.suppress_tokens), options.get("language"),
                                    options.get("task", "transcribe"), device, dtype)


def check_settings(settings: WorkerSettings, local: bool) -> None:
    """Load the model and its assistant once here, on the CPU, before any worker does: a language the vocabulary
    lacks, a bad suppressed token or an incompatible assistant is then one line, not a stack trace per worker.
    The device is checked only for Ray on this machine: a cluster's workers may have GPUs this one lacks."""
    import torch

    from .checks import check_device_available

    if local:
        check_device_available(settings.device)
    with torch.no_grad():
        load_for_settings(settings, "cpu", None)


def _local_copy(path: str, scratch: str, index: int) -> str:
    """A local path to decode: the path itself, or for a URI a copy of its bytes in `scratch`."""
    if not is_uri(path):
        return path
    try:
        filesystem, inner = _uri_filesystem(path)
    except JobError as err:
        raise OSError(str(err)) from None
    local = os.path.join(scratch, f"{index}{os.path.splitext(inner)[1]}")
    with filesystem.open_input_stream(inner) as source, open(local, "wb") as target:
        shutil.copyfileobj(source, target)
    return local


class Transcriber:
    """A Ray Data actor: the model and its assistant loaded once; each batch of rows (path, output stem) ->
    one JSON results row per file, its outputs written. A bad file fails alone."""

    def __init__(self, settings: WorkerSettings, output_dir: str):
        started = time.perf_counter()
        import torch

        torch.set_num_threads(settings.threads)
        self.model, self.assistant = load_for_settings(settings, settings.device, settings.dtype)
        self.settings, self.output_dir = settings, output_dir
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.load_seconds = time.perf_counter() - started

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        files = [AudioFile(str(path), str(stem)) for path, stem in zip(batch["path"], batch["output_stem"])]
        rows = self.transcribe(files)
        return {"row": np.array([json.dumps(row, ensure_ascii=False) for row in rows], dtype=object)}

    def transcribe(self, files: list[AudioFile]) -> list[dict]:
        """Rows for `files`, in order; a URI's bytes are copied to a scratch file first."""
        with tempfile.TemporaryDirectory(prefix="specwhisper-") as scratch:
            rows, readable = {}, []
            for index, file in enumerate(files):
                try:
                    readable.append((file, _local_copy(file.path, scratch, index)))
                except OSError as err:
                    rows[file.path] = self._failed(file, f"cannot read {file.path}: {err}", time.perf_counter())
            for row in self._decode(readable):
                rows[row["file"]] = row
        return [rows[file.path] for file in files]

    def _decode(self, pairs: list[tuple[AudioFile, str]]) -> list[dict]:
        """(file, the path to read it at) -> a row per file: transcribed together, each bad file alone."""
        import torch

        from .errors import SpecWhisperError
        from .transcription import transcribe_many

        rows = []
        started = batch_started = time.perf_counter()
        try:
            with torch.no_grad():
                results = transcribe_many(self.model, [local for _, local in pairs], assistant=self.assistant,
                                          **self.settings.options)
                for (file, local), result in zip(pairs, results):
                    if isinstance(result, SpecWhisperError):  # its message names the scratch copy of a URI
                        rows.append(self._failed(file, str(result).replace(local, file.path), started))
                    else:
                        rows.append(self._succeeded(file, result, started))
                    started = time.perf_counter()
        except Exception as err:  # noqa: BLE001 - one file's surprise must not end the job
            if len(pairs) - len(rows) > 1:  # a batch: find the file at fault alone
                return rows + [row for pair in pairs[len(rows):] for row in self._decode([pair])]
            message = f"{type(err).__name__}: {err}".splitlines()[0]
            rows.append(self._failed(pairs[len(rows)][0], message, started))
        if len(pairs) > 1:  # decoded together: each file gets an equal share of the batch's time
            share = round((time.perf_counter() - batch_started) / len(pairs), 3)
            for row in rows:
                row.update(wall_seconds=share, batch_files=len(pairs))
        return rows

    def _worker_fields(self, started: float) -> dict:
        return {"worker": self.worker, "wall_seconds": round(time.perf_counter() - started, 3),
                "worker_load_seconds": round(self.load_seconds, 3)}

    def _failed(self, file: AudioFile, error: str, started: float) -> dict:
        return {**failed_row(file, error), **self._worker_fields(started)}

    def _succeeded(self, file: AudioFile, result, started: float) -> dict:
        from .outputs import write_outputs

        folder = Path(self.output_dir) / os.path.dirname(file.output_stem)  # the file's name gives the rest
        written = write_outputs(result, file.path, folder, self.settings.formats, self.settings.subtitles)
        s = result.stats
        return {**file_row(file), **self._worker_fields(started), "status": "ok", "error": None,
                "audio_seconds": round(result.audio_seconds, 3), "language": result.language,
                "outputs": [os.path.relpath(p, self.output_dir) for p in written], "text": result.text,
                "windows": result.windows, "fallbacks": result.fallbacks, "tokens": s.generated_tokens,
                "main_passes": s.main_passes, "drafted": s.drafted, "accepted": s.accepted,
                "tokens_per_main_pass": round(s.tokens_per_main_pass, 3),
                "timings": {name: round(value, 3) for name, value in result.timings.items()}}


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise JobError("transcribe-many runs on Ray, which is not installed: pip install 'specwhisper[ray]'") from None
    return ray


def start_ray(address: str | None):
    """Join the cluster at `address`, or start Ray on this machine sized to its cores; quiet by default."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    try:
        if address is None:
            ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=True)
        else:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise JobError(f"cannot {'start Ray' if address is None else 'join the Ray cluster at ' + address}: "
                       f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return ray


def transcribe_files(sources: Iterable[str | os.PathLike], output_dir: str | os.PathLike,
                     settings: WorkerSettings | None = None, *, ray_address: str | None = None,
                     workers: int | None = None, retry_failed: bool = False, progress: bool = True,
                     log: Callable[[str], None] | None = None, worker_class: type | None = None) -> JobSummary:
    """Transcribe every audio file in `sources` (folders, manifests, files) on Ray, as `specwhisper transcribe`
    would one by one; outputs and `results.jsonl` under `output_dir`.

    settings: the model, its assistant, the output formats and `transcribe_many`'s options (WorkerSettings).
    ray_address: a running cluster to join ('auto', or its head's host:port); None starts Ray here.
    workers: actors, each with `settings.threads` CPUs (default: the cluster's CPUs / settings.threads).
    retry_failed: also try again the files an earlier run recorded as failed.
    log: where one-line messages go (failed files; default: stderr).
    worker_class: the actor, `Transcriber` or a subclass of it (to add to each row, say).
    Returns the run's JobSummary.
    """
    settings = settings or WorkerSettings()
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    started = time.perf_counter()
    output_dir = Path(output_dir).expanduser().resolve()
    files = plan_outputs(find_audio(sources))
    if not files:
        raise JobError("no audio files in " + ", ".join(str(s) for s in sources))
    table = output_dir / RESULTS_TABLE
    _compact(table)  # drops a line a killed job cut short, so that the rows appended below stand on their own
    previous = read_results(table)
    todo = [f for f in files if not is_done(previous.get(f.path), f, output_dir, settings.formats, retry_failed)]
    pending = {f.path for f in todo}
    summary = JobSummary(files=len(files), skipped=len(files) - len(todo), results_table=str(table),
                         skipped_failed=sum(previous[f.path]["status"] != "ok" for f in files if f.path not in pending))
    if todo:
        check_settings(settings, local=ray_address is None)
        output_dir.mkdir(parents=True, exist_ok=True)
        ray = start_ray(ray_address)
        resources = ray.cluster_resources()
        summary.workers = min(workers or default_workers(resources, settings), len(todo))
        if settings.gpus * summary.workers > resources.get("GPU", 0):
            raise JobError(f"{summary.workers} workers of {settings.gpus:g} GPU need {settings.gpus * summary.workers:g} "
                           f"GPUs; the Ray cluster has {resources.get('GPU', 0):g}")
        rows = _run(ray, worker_class or Transcriber, todo, str(output_dir), settings, summary.workers, progress)
        with open(table, "a", encoding="utf-8") as out:
            for row in rows:  # as each file finishes: a killed job keeps every row it wrote
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                out.flush()
                if row["status"] == "ok":
                    summary.succeeded += 1
                    summary.audio_seconds += row["audio_seconds"]
                else:
                    summary.failed += 1
                    log(f"specwhisper: failed: {row['file']}: {row['error']}")
    _compact(table)
    summary.wall_seconds = time.perf_counter() - started
    return summary


def default_workers(resources: dict, settings: WorkerSettings) -> int:
    """As many workers as the cluster's CPUs (and GPUs, when workers reserve them) hold."""
    count = max(1, int(resources.get("CPU", 1) // settings.threads))
    if settings.gpus > 0:
        count = min(count, max(1, int(resources.get("GPU", 0) // settings.gpus)))
    return count


def _run(ray, worker_class: type, files: list[AudioFile], output_dir: str, settings: WorkerSettings, workers: int,
         progress: bool):
    """Yield the results rows of `files` as the workers finish them; a file whose worker died on it (a crash,
    out of memory) twice gets a failed row at the end."""
    import warnings

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.print_on_execution_start = False
    context.max_errored_blocks = -1  # a batch whose worker died is dropped, not the job (its rows come below)
    batch_size = settings.options.get("batch_size", 1)
    items = [{"path": f.path, "output_stem": f.output_stem} for f in files]
    # One block per batch, one batch in flight per worker: an idle worker takes the next files at once, and a
    # killed job loses only the files in flight.
    dataset = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // batch_size)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")  # no named parameter for retries yet
        dataset = dataset.map_batches(
            worker_class, fn_constructor_kwargs={"settings": settings, "output_dir": output_dir},
            batch_size=batch_size, num_cpus=settings.threads, num_gpus=settings.gpus or None,
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
            max_task_retries=1)  # Ray Data's default retries forever: a file that crashes its worker would loop
    returned = set()
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for text in batch["row"]:
                row = json.loads(text)
                returned.add(row["file"])
                yield row
    except ray.exceptions.RayError as err:  # the workers could not start (their traces are in Ray's log)
        message = str(err).strip().splitlines()
        reason = message[-1].strip().strip("'") if message else repr(err)
        raise JobError(f"the Ray job failed after {len(returned)} files: {reason}; "
                       "the results table keeps them: the same command again goes on") from None
    for file in files:
        if file.path not in returned:
            yield {**failed_row(file, "its worker died transcribing it, twice (a crash, or out of memory: see "
                                      "Ray's log)"), "worker": None, "wall_seconds": None}


def _compact(table: Path) -> None:
    """Rewrite the table with one row per file (the last), atomically."""
    if not table.is_file():
        return
    rows = read_results(table)
    staging = table.with_suffix(".jsonl.partial")
    with open(staging, "w", encoding="utf-8") as out:
        for row in rows.values():
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(staging, table)


def settings_from_args(args) -> WorkerSettings:
    """`transcribe-many`'s parsed (and checked) flags -> the workers' settings."""
    from .cli import subtitle_options, transcription_options
    from .outputs import output_formats

    return WorkerSettings(
        model=args.model, assistant=args.assistant, draft_length=args.draft_length, device=args.device,
        dtype=args.dtype, threads=args.threads_per_worker, gpus=args.gpus_per_worker, suppress_tokens=tuple(args.suppress_tokens),
        formats=output_formats(args.output_format), subtitles=subtitle_options(args), model_dir=args.model_dir,
        options=transcription_options(args))


