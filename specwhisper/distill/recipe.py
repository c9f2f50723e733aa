"""The whole recipe: audio folders in, a saved draft out (`specwhisper distill`)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..draft import DraftNetwork, ShortlistHead, build_draft_network, spread_layers, with_shortlist
from ..draft_files import DraftConfig, load_draft, new_config, read_config, save_draft, wrap
from ..errors import SpecWhisperError
from .data import AudioFile, AugmentOptions, find_audio, long_form_specs, plan_windows, split_files
from .shortlist import choose_shortlist, coverage_line, shortlist_coverage
from .teacher import MAX_NEW_TOKENS, TOP_K, TeacherWindow, fill_hidden, teacher_pass
from .train import TrainOptions, TrainResult, train, validate

if TYPE_CHECKING:
    from ..speech_model import SpeechModel


@dataclass(frozen=True)
class DistillOptions:
    layers: int = 2
    from_layers: tuple[int, ...] | None = None  # main layers the blocks start from (sets `layers`); default: spread
    head: str = "shortlist"
    shortlist_size: int = 8192
    rank: int = 64
    val_fraction: float = 0.15
    top_k: int = TOP_K
    max_new_tokens: int = MAX_NEW_TOKENS  # per window, in the teacher pass
    storage_dtype: str = "float32"
    features: bool = False  # the draft reads the main model's hidden states (specwhisper.draft)
    # A saved draft to start from instead of the main model's layers; its layers, head and features
    # are kept (the options above for them are ignored), its shortlist is chosen again from the new audio.
    init: str | None = None
    augment: AugmentOptions = field(default_factory=AugmentOptions)
    train: TrainOptions = field(default_factory=TrainOptions)


@dataclass
class TeacherData:
    """The audio a draft learns from, split and read by the main model."""

    files: list[AudioFile]
    train_files: list[AudioFile]
    val_files: list[AudioFile]
    train_windows: list[TeacherWindow]
    val_windows: list[TeacherWindow]


def distill(main: SpeechModel, audio: list[str | Path], out: str | Path, options: DistillOptions = DistillOptions(),
            resume: bool = False, progress: bool = True, eval_audio: list[str | Path] | None = None,
            command: str | None = None, log=print) -> tuple[SpeechModel, DraftConfig, TrainResult]:
    """Distil a draft for `main` from unlabelled audio and save it to `out` (a folder).

    Returns the trained draft (a SpeechModel around `main`), its config and the training history.
    `out/checkpoint.pt` is kept for `resume`.
    """
    out = Path(out)
    torch.manual_seed(options.train.seed)
    options, start = check_start(main, options)  # before the teacher pass, which can take an hour
    data = teach(main, audio, options, progress, log)
    if start is not None:
        network, init_layers = warm_start(main, start.network, read_config(start.folder), options.init, data, log)
    else:
        network, init_layers = new_draft(main, options, data, log)

    def config_for(result: TrainResult) -> DraftConfig:
        return new_config(main, network, init_layers, training_record(options, data, result, audio, command, start))

    started = time.perf_counter()
    result = train(main, network, data.train_windows, data.val_windows, options.train, checkpoint_dir=out,
                   resume=resume, progress=progress, log=log,
                   on_best=lambda net, r: save_draft(net, config_for(r), out, dtype=options.storage_dtype, main=main))
    log(f"training: {time.perf_counter() - started:.0f} s, best validation agreement "
        f"{100 * result.best_agreement:.1f}% (epoch {result.best_epoch}; {100 * result.initial_agreement:.1f}% "
        "before training)")
    config = config_for(result)
    if eval_audio:
        config.training["eval"] = evaluate_agreement(main, network, eval_audio, progress=progress, log=log)
    save_draft(network, config, out, dtype=options.storage_dtype, main=main)
    return wrap(main, network, name=f"{main.name}+draft{options.layers}", folder=out), config, result


def check_start(main: SpeechModel, options: DistillOptions) -> tuple[DistillOptions, SpeechModel | None]:
    """The options with the draft's shape settled: from `from_layers`, or from the `init` draft, which is
    loaded (unpacked, so trainable) and checked against `main` here."""
    if options.from_layers:
        if not all(0 <= layer < main.dims.n_text_layer for layer in options.from_layers):
            raise SpecWhisperError(f"--from-layers {' '.join(map(str, options.from_layers))}: {main.name} has "
                                   f"decoder layers 0 to {main.dims.n_text_layer - 1}")
        options = replace(options, layers=len(options.from_layers))
    if options.init is None:
        return options, None
    start = load_draft(main, options.init, prepack=False)
    config = read_config(start.folder)
    return replace(options, layers=config.n_layer, head=config.head, features=config.features,
                   shortlist_size=len(config.shortlist or ()) or options.shortlist_size,
                   rank=config.rank or options.rank), start


def teach(main: SpeechModel, audio: list[str | Path], options: DistillOptions, progress: bool, log) -> TeacherData:
    """Find the audio, split it into training and validation files, plan the windows and run the
    main model over them (cached)."""
    files = find_audio(audio)
    if not main.tokenizer.multilingual:
        skipped = [f for f in files if f.language not in (None, "en")]
        if skipped:
            log(f"{main.name} is English-only: skipping {len(skipped)} non-English files")
        files = [f for f in files if f.language in (None, "en")]
    train_files, val_files = split_files(files, options.val_fraction, options.train.seed)
    train_specs = plan_windows(train_files, options.augment, options.train.seed)
    plain = replace(options.augment, speeds=(), crops=0)  # validation windows: no speed or crop variants
    val_specs = [replace(s, seed=s.seed + 1) for s in plan_windows(val_files, plain, options.train.seed + 1)]
    log(f"{len(files)} files ({sum(f.seconds for f in files) / 60:.1f} min): {len(train_files)} for training "
        f"({sum(f.seconds for f in train_files) / 60:.1f} min, {len(train_specs)} windows with augmentation), "
        f"{len(val_files)} for validation ({len(val_specs)} windows); languages: "
        f"{', '.join(sorted(set(str(f.language) for f in files)))}")
    started = time.perf_counter()
    settings = dict(top_k=options.top_k, max_new_tokens=options.max_new_tokens, progress=progress)
    train_windows = teacher_pass(main, train_specs, label="teacher (train)", **settings)
    val_windows = teacher_pass(main, val_specs, label="teacher (validation)", **settings)
    if options.train.hidden_weight or options.features:
        fill_hidden(main, train_windows, context=options.features)
    log(f"teacher pass: {sum(w.n_targets for w in train_windows)} training tokens, "
        f"{sum(w.n_targets for w in val_windows)} validation tokens, "
        f"{sum(w.seconds for w in train_windows) / 60:.1f} min of augmented audio "
        f"({time.perf_counter() - started:.0f} s)")
    return TeacherData(files, train_files, val_files, train_windows, val_windows)


def new_draft(main: SpeechModel, options: DistillOptions, data: TeacherData, log
              ) -> tuple[DraftNetwork, tuple[int, ...]]:
    """A fresh draft from the main model's layers, with a shortlist chosen from the teacher's tokens."""
    init_layers = options.from_layers or spread_layers(main.dims.n_text_layer, options.layers)
    shortlist = None
    if options.head == "shortlist":
        shortlist = choose_shortlist(main.tokenizer, data.train_windows, options.shortlist_size)
        log(f"shortlist: {len(shortlist)} tokens; {coverage_line(shortlist, data.train_windows, data.val_windows)}")
    network = build_draft_network(main, init_layers, options.head, shortlist=shortlist, rank=options.rank,
                                  features=options.features)
    log(f"draft: {options.layers} layers from main layers {list(init_layers)}, {options.head} head"
        + (", reads the main model's hidden states" if options.features else ""))
    return network, init_layers


def warm_start(main: SpeechModel, network: DraftNetwork, config: DraftConfig, source: str | Path,
               data: TeacherData, log=print) -> tuple[DraftNetwork, tuple[int, ...]]:
    """The saved draft `network` (loaded unpacked, so trainable), ready to continue training (`distill --init`).

    A shortlist head's list is chosen again from the new teacher outputs, at the same size: more audio
    shows more of the tokens the main model emits, and a token outside the list can never be drafted.
    """
    head = network.decoder.output_projection
    kept = ""
    if isinstance(head, ShortlistHead):
        before = coverage_line(head.ids.tolist(), data.train_windows, data.val_windows)
        shortlist = choose_shortlist(main.tokenizer, data.train_windows, len(head.ids))
        kept = f"; {len(set(shortlist) & set(head.ids.tolist()))} of its {len(head.ids)} shortlist tokens kept"
        with_shortlist(network, shortlist)
        log(f"shortlist chosen again: {coverage_line(shortlist, data.train_windows, data.val_windows)} (was: {before})")
    log(f"draft: starting from {source} ({config.n_layer} layers from main layers {list(config.init_layers)}, "
        f"{config.head} head" + (", reads the main model's hidden states" if config.features else "") + kept + ")")
    return network, config.init_layers




def training_record(options: DistillOptions, data: TeacherData, result: TrainResult, audio: list[str | Path],
                    command: str | None, start: SpeechModel | None) -> dict:
    """How the draft was made, for its draft.json."""
    train_windows = data.train_windows
    training = {
        "command": command, "audio": [str(a) for a in audio], "files": len(data.files),
        "train_files": len(data.train_files), "windows": len(train_windows),
        "validation_files": sorted(Path(f.path).name for f in data.val_files),
        "train_tokens": sum(w.n_targets for w in train_windows),
        "augmented_minutes": round(sum(w.seconds for w in train_windows) / 60, 2),
        "epochs_run": len(result.history), "best_epoch": result.best_epoch,
        "validation_agreement": round(result.best_agreement, 4),
        "initial_validation_agreement": round(result.initial_agreement, 4),
        "validation_kl": round(result.history[result.best_epoch - 1].val_kl, 4) if result.best_epoch else None,
        "initial_validation_kl": round(result.initial_kl, 4),
        "options": {k: v for k, v in asdict(options).items()},
    }
    if start is not None:  # how the starting point was made, so the chain can be reproduced
        init_config = read_config(start.folder)
        training["init"] = {"draft": str(options.init), "command": init_config.training.get("command"),
                            "eval": init_config.training.get("eval")}
    return training


def evaluate_agreement(main: SpeechModel, network: DraftNetwork, paths: list[str | Path], timestamps: bool = True,
                       progress: bool = True, log=None) -> dict:
    """The draft's agreement with the main model's greedy tokens on recordings never trained on, cut
    into consecutive 30-s windows each prompted with the previous window's transcript (what long-form
    decoding feeds the decoder)."""
    files = find_audio(paths)
    specs = long_form_specs(files, timestamps=timestamps)
    windows = teacher_pass(main, specs, chains=[spec.sources[0] for spec in specs], progress=progress,
                           label="eval teacher")
    kl, agreement, details = validate(main, network, windows)
    details.update(kl=kl, windows=len(windows), tokens=sum(w.n_targets for w in windows),
                   audio_seconds=sum(w.seconds for w in windows))
    head = network.decoder.output_projection
    if isinstance(head, ShortlistHead):
        details["shortlist_coverage"] = shortlist_coverage(head.ids.tolist(), windows)
    if log is not None:
        log(f"agreement on {', '.join(map(str, paths))} (never trained on): {100 * agreement:.1f}% over "
            f"{details['tokens']} tokens in {details['windows']} windows"
            + (f"; shortlist covers {100 * details['shortlist_coverage']:.1f}%" if "shortlist_coverage" in details
               else "")
            + (f"; first draft {100 * details['agreement_first']:.1f}%, later drafts "
               f"{100 * details['agreement_fed_back']:.1f}%" if "agreement_first" in details else ""))
    return {"audio": [str(a) for a in paths], "agreement": round(agreement, 4),
            **{k: v for k, v in details.items() if k != "per_language"}}
