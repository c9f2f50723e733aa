"""A distilled draft on disk: a folder with `draft.json` and `draft.safetensors`.

`draft.json` says which main model the draft belongs to (its dims and a fingerprint of its
weights), which main layers its blocks started from, its head and how it was trained;
`draft.safetensors` holds only the draft's own tensors (blocks, LayerNorm, fusion, head), in
float32, float16 or int8-delta (each weight matrix as the int8 change from the main layer it
started from, with a per-row scale). `load_draft(main, folder)` rebuilds the draft around the
already-loaded `main` and refuses, in one line, a draft made for another model; `find_draft`
finds the one made for a model (`--assistant auto`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .draft import DEFAULT_RANK, DraftNetwork, LowRankHead, ShortlistHead, main_block_states, make_head
from .errors import IncompatibleAssistantError, WeightsError
from .model import ModelDims, Whisper
from .prepack import int8_available, prepack_available
from .speech_model import SpeechModel
from .weights.checksums import check_sha256
from .weights.resolve import cache_dir

FORMAT = "specwhisper-draft"
FORMAT_VERSION = 1
CONFIG_FILE = "draft.json"
WEIGHTS_FILE = "draft.safetensors"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# int8-delta: a quarter of float32's size, rounding error ~0.1 % of a weight's norm (docs/drafts.md).
STORAGE_FORMATS = (*STORAGE_DTYPES, "int8-delta")
DELTA_LEVELS = 127  # int8 range used: symmetric, -127..127
DELTA_MARKER = "__int8_delta__"  # a one-element tensor present only in int8-delta files
SHIPPED_DRAFTS = Path(__file__).resolve().parent / "assets" / "drafts"
# SHA-256 of each shipped draft's files, pinned here rather than beside them, so that whatever
# replaces the files cannot replace their checksums too.
SHIPPED_SHA256 = {
    "base": {CONFIG_FILE: "f8f3c982545cae1941a6c36cfbc1b2a326fb7eb95d27bba8767e340ebb610eb9",
             WEIGHTS_FILE: "cee8e010d4546c1679247982082611410e5d80ed0633bc906d141584763d14c7"},
}

# The main model's fingerprint: a few values of tensors no load-time pass rewrites, compared with a
# tolerance so that the same weights loaded in fp16 or bf16 still match.
FINGERPRINT_TENSORS = ("decoder.token_embedding.weight", "decoder.positional_embedding", "encoder.conv1.weight",
                       "encoder.ln_post.weight", "decoder.ln.weight")
FINGERPRINT_VALUES_PER_TENSOR = 8
FINGERPRINT_RTOL = 2e-2  # bf16 keeps ~3 significant digits
FINGERPRINT_ATOL = 2e-3


@dataclass(frozen=True)
class DraftConfig:
    """What a saved draft is, and what it needs from the main model it is rebuilt around."""

    main_name: str
    main_dims: ModelDims
    main_fingerprint: tuple[float, ...]
    init_layers: tuple[int, ...]  # main decoder layer each draft block started from
    head: str = "full"
    shortlist: tuple[int, ...] | None = None  # head "shortlist": the token ids it can propose, best first
    rank: int | None = None  # head "lowrank"
    training: dict = field(default_factory=dict)  # how it was made: command, data, agreement, ...
    features: bool = False  # reads the main model's hidden state of the previous position

    @property
    def n_layer(self) -> int:
        return len(self.init_layers)

    def as_json(self) -> dict:
        out = asdict(self)
        out["main_dims"] = asdict(self.main_dims)
        out["main_fingerprint"] = list(self.main_fingerprint)
        out["init_layers"] = list(self.init_layers)
        out["shortlist"] = None if self.shortlist is None else list(self.shortlist)
        return {"format": FORMAT, "version": FORMAT_VERSION, **out}

    @classmethod
    def from_json(cls, data: dict, source: str) -> "DraftConfig":
        if data.get("format") != FORMAT:
            raise IncompatibleAssistantError(f"{source}: not a specwhisper draft (format {data.get('format')!r})")
        if data.get("version") != FORMAT_VERSION:
            raise IncompatibleAssistantError(f"{source}: draft format version {data.get('version')}, "
                                             f"this specwhisper reads version {FORMAT_VERSION}")
        try:
            return cls(main_name=data["main_name"], main_dims=ModelDims(**data["main_dims"]),
                       main_fingerprint=tuple(data["main_fingerprint"]), init_layers=tuple(data["init_layers"]),
                       head=data["head"], shortlist=None if data["shortlist"] is None else tuple(data["shortlist"]),
                       rank=data.get("rank"), training=data.get("training") or {},
                       features=bool(data.get("features", False)))
        except (KeyError, TypeError) as err:
            raise IncompatibleAssistantError(f"{source}: malformed draft config ({type(err).__name__}: {err})") from None


def fingerprint(network: Whisper) -> tuple[float, ...]:
    """A few weight values that identify the main model (dtype-independent: compared with a tolerance)."""
    tensors = dict(network.named_parameters()) | dict(network.named_buffers())
    values: list[float] = []
    for name in FINGERPRINT_TENSORS:
        flat = tensors[name].detach().reshape(-1)
        n = FINGERPRINT_VALUES_PER_TENSOR
        index = torch.arange(n, device=flat.device) * (flat.numel() - 1) // (n - 1)  # evenly spaced, ends included
        values += flat[index].float().cpu().tolist()
    return tuple(values)


def check_main(config: DraftConfig, main: SpeechModel, source: str) -> None:
    """Raise IncompatibleAssistantError (one line) unless `main` is the model the draft was made for."""
    theirs, ours = config.main_dims, main.dims
    if theirs != ours:
        differ = [f"{k} {getattr(theirs, k)} vs {getattr(ours, k)}" for k in asdict(ours)
                  if getattr(theirs, k) != getattr(ours, k)]
        raise IncompatibleAssistantError(f"{source}: draft made for {config.main_name}, whose dims differ from "
                                         f"{main.name}'s ({', '.join(differ[:3])})")
    expected = torch.tensor(config.main_fingerprint)
    actual = torch.tensor(fingerprint(main.network))
    if expected.shape != actual.shape or not torch.allclose(actual, expected, rtol=FINGERPRINT_RTOL,
                                                            atol=FINGERPRINT_ATOL):
        raise IncompatibleAssistantError(f"{source}: draft made for {config.main_name}, but {main.name}'s weights "
                                         "differ from that model's (fingerprint mismatch)")


def new_config(main: SpeechModel, network: DraftNetwork, init_layers: tuple[int, ...], training: dict | None = None
               ) -> DraftConfig:
    head = network.decoder.output_projection
    kind, shortlist, rank = "full", None, None
    if isinstance(head, ShortlistHead):
        kind, shortlist = "shortlist", tuple(int(i) for i in head.ids.tolist())
    elif isinstance(head, LowRankHead):
        kind, rank = "lowrank", head.down.out_features
    return DraftConfig(main_name=main.name, main_dims=main.dims, main_fingerprint=fingerprint(main.network),
                       init_layers=tuple(init_layers), head=kind, shortlist=shortlist, rank=rank,
                       training=dict(training or {}), features=network.decoder.reads_features)


def wrap(main: SpeechModel, network: DraftNetwork, name: str, folder: Path | None = None) -> SpeechModel:
    """The draft as a SpeechModel: the main model's tokenizer object and decoding rules."""
    return SpeechModel(network=network, tokenizer=main.tokenizer, name=name, folder=folder or main.folder,
                       suppress_tokens=list(main.suppress_tokens),
                       begin_suppress_tokens=list(main.begin_suppress_tokens))


# ----------------------------------------------------------------------------- saving

def init_state(main: SpeechModel, config: DraftConfig) -> dict[str, Tensor]:
    """What the draft's own blocks and LayerNorm started from (own_state_dict names, fp32 CPU)."""
    state = {f"blocks.{i}.{k}": v for i, block in enumerate(main_block_states(main, config.init_layers))
             for k, v in block.items()}
    state.update({f"ln.{k}": v.detach().to("cpu", torch.float32) for k, v in main.network.decoder.ln.state_dict().items()})
    return state


def save_draft(network: DraftNetwork, config: DraftConfig, folder: str | os.PathLike, dtype: str = "float32",
               main: SpeechModel | None = None) -> Path:
    """Write draft.json and draft.safetensors (the draft's own tensors, in `dtype`) into `folder`.

    float32 reloads bit-identically; float16 halves the file; int8-delta quarters it, and reloads to
    the same values every time (init + int8 x scale in fp32).
    """
    from safetensors.torch import save_file

    if dtype not in STORAGE_FORMATS:
        raise ValueError(f"storage dtype must be one of {', '.join(STORAGE_FORMATS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    own = {k: v.detach().to("cpu") for k, v in network.own_state_dict().items()}
    if dtype == "int8-delta":
        if main is None:
            raise ValueError("int8-delta storage needs the main model (the layers the draft started from)")
        tensors = encode_deltas(own, init_state(main, config))
    else:
        tensors = {k: v.to(STORAGE_DTYPES[dtype] if v.is_floating_point() else v.dtype).contiguous().clone()
                   for k, v in own.items()}
    data = config.as_json()
    data["storage_dtype"] = dtype
    # Write to temporary names and rename, so an interrupted save never leaves a half-written draft.
    tmp_weights, tmp_config = folder / (WEIGHTS_FILE + ".tmp"), folder / (CONFIG_FILE + ".tmp")
    save_file(tensors, str(tmp_weights), metadata={"format": FORMAT})
    tmp_config.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp_weights, folder / WEIGHTS_FILE)
    os.replace(tmp_config, folder / CONFIG_FILE)
    return folder


def encode_deltas(own: dict[str, Tensor], init: dict[str, Tensor]) -> dict[str, Tensor]:
    """Weight matrices with a starting point -> {name.q: int8 (rows, cols), name.scale: fp32 (rows,)};
    the rest (biases, LayerNorms, head) as fp32."""
    tensors = {DELTA_MARKER: torch.ones(1, dtype=torch.int8)}
    for name, value in own.items():
        if value.dim() == 2 and name in init and value.is_floating_point():
            delta = value.float() - init[name]
            scale = (delta.abs().amax(dim=1) / DELTA_LEVELS).clamp_min(torch.finfo(torch.float32).tiny)
            tensors[f"{name}.q"] = (delta / scale[:, None]).round().clamp(-DELTA_LEVELS, DELTA_LEVELS).to(torch.int8)
            tensors[f"{name}.scale"] = scale
        else:
            tensors[name] = value.float().contiguous().clone() if value.is_floating_point() else value.clone()
    return tensors


def decode_deltas(tensors: dict[str, Tensor], init: dict[str, Tensor]) -> dict[str, Tensor]:
    state = {}
    for name, value in tensors.items():
        if name.endswith(".q"):
            base = name[:-2]
            if base not in init:
                raise IncompatibleAssistantError(f"draft tensor {base}: stored as a change, but has no starting point")
            state[base] = init[base] + value.float() * tensors[f"{base}.scale"][:, None]
        elif not name.endswith(".scale"):
            state[name] = value
    return state


# ----------------------------------------------------------------------------- loading and finding

def draft_folder(path: str | os.PathLike) -> Path | None:
    """The draft folder `path` names (the folder, or its draft.json / draft.safetensors), or None."""
    path = Path(path)
    if path.is_file() and path.name in (CONFIG_FILE, WEIGHTS_FILE):
        path = path.parent
    return path if (path / CONFIG_FILE).is_file() else None


def read_config(folder: str | os.PathLike) -> DraftConfig:
    folder = Path(folder)
    try:
        data = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IncompatibleAssistantError(f"{folder / CONFIG_FILE}: unreadable draft config ({err})") from None
    return DraftConfig.from_json(data, str(folder))


def load_draft(main: SpeechModel, path: str | os.PathLike, prepack: bool = True, int8: bool | None = None
               ) -> SpeechModel:
    """Rebuild a saved draft around the already-loaded `main` (sharing its encoder and embeddings).

    Raises IncompatibleAssistantError (one line) when the draft was made for another model, and
    WeightsError when a shipped draft's files are not the released bytes.
    prepack: on the CPU in fp32, pack the draft's own linears (as `load_model` does).
    int8: run those linears in int8; default: on the CPU whenever it is available.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = draft_folder(path)
    if folder is None:
        raise IncompatibleAssistantError(f"{path}: no {CONFIG_FILE} (not a specwhisper draft)")
    check_shipped(folder)
    config = read_config(folder)
    check_main(config, main, str(folder))
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise IncompatibleAssistantError(f"{folder / WEIGHTS_FILE}: cannot read the draft's weights "
                                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if state.pop(DELTA_MARKER, None) is not None:
        state = decode_deltas(state, init_state(main, config))
    network = empty_draft_network(main, config)
    network.load_own_state(state)
    if prepack and prepack_available(main.device, main.dtype):
        network.prepack(main.network, int8=int8_available() if int8 is None else int8)
    return wrap(main, network, name=f"{main.name}+draft{config.n_layer}", folder=folder)


def check_shipped(folder: Path) -> None:
    """Raise WeightsError (one line) if `folder` is a shipped draft whose bytes are not the released ones.

    A user's own drafts are theirs to change and are not checked. Hashing the ~11 MB takes ~7 ms.
    """
    real = folder.resolve()  # a user's symlink to a shipped draft is the shipped draft
    if real.parent != SHIPPED_DRAFTS.resolve():
        return
    pinned = SHIPPED_SHA256.get(real.name)
    if pinned is None:
        raise WeightsError(f"{folder}: a draft among the shipped ones without pinned SHA-256 checksums; "
                           "reinstall specwhisper")
    for name, expected in pinned.items():
        check_sha256(folder / name, expected, "reinstall specwhisper")


def empty_draft_network(main: SpeechModel, config: DraftConfig) -> DraftNetwork:
    """A draft network of the config's shape around `main`, its own tensors not yet filled in."""
    network = DraftNetwork(main.network, config.n_layer, config.features)
    if config.head == "shortlist" and (not config.shortlist or max(config.shortlist) >= main.dims.n_vocab
                                       or min(config.shortlist) < 0):
        raise IncompatibleAssistantError("draft config: a shortlist head needs ids inside the vocabulary")
    try:
        make_head(network.decoder, config.head, config.shortlist, config.rank or DEFAULT_RANK, from_svd=False)
    except ValueError as err:
        raise IncompatibleAssistantError(f"draft config: {err}") from None
    return network.eval()


def draft_search_path() -> list[Path]:
    """Where `find_draft` looks, in order: drafts saved under the specwhisper cache
    (`cache_dir()/drafts/<name>/`: a user's own, which win), then the ones shipped in the package."""
    return [cache_dir() / "drafts", SHIPPED_DRAFTS]


def find_draft(main: SpeechModel) -> Path | None:
    """The first draft folder on `draft_search_path()` made for exactly this main model, or None.

    Only configs are read (a few kB each); a draft for another model is skipped, not an error.
    """
    for root in draft_search_path():
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if (p / CONFIG_FILE).is_file()):
            try:
                check_main(read_config(folder), main, str(folder))
            except IncompatibleAssistantError:
                continue
            if (folder / WEIGHTS_FILE).is_file():
                return folder
    return None
