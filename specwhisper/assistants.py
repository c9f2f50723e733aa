"""Which drafter an assistant model makes for a main model, decided once, when it is loaded.

    load_assistant(main, "tiny.en")           # a model name, hub id or folder, or a draft folder
    resolve_auto_assistant(main)              # `--assistant auto`: the distilled draft made for main
    make_assistant(main, already_loaded)      # the check and the choice, for a loaded SpeechModel

An assistant with the main model's vocabulary drafts tokens directly (`ModelDrafter`), reading the
main model's encoder output when its encoder is the same (a distil-whisper student, verified tensor
by tensor, or a distilled draft, which shares the module); one with another vocabulary drafts text
(`CrossTokenizerDrafter`); a distilled draft is a `DistilledDrafter`. Anything that cannot draft for the
main model is refused in one line.
"""

from __future__ import annotations

import torch

from .draft import DraftNetwork
from .draft_files import draft_folder, find_draft, load_draft
from .drafters import CrossTokenizerDrafter, DistilledDrafter, Drafter, ModelDrafter
from .errors import IncompatibleAssistantError
from .loading import load_model
from .speech_model import SpeechModel
from .tokenizer import Tokenizer


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    if a is b:  # a distilled draft holds the main model's own tokenizer
        return True
    if a.n_vocab != b.n_vocab or a.eot != b.eot or a.timestamp_begin != b.timestamp_begin:
        return False
    return all(a.token_bytes(i) == b.token_bytes(i) for i in range(a.eot))


def encoders_match(main: SpeechModel, assistant: SpeechModel, atol: float = 1e-3) -> bool:
    """True when the assistant's encoder is the main model's, tensor for tensor (a distil-whisper student)."""
    if main.network.encoder is assistant.network.encoder:  # a distilled draft shares the module itself
        return True
    if main.dims.n_audio_state != assistant.dims.n_audio_state or main.dims.n_audio_layer != assistant.dims.n_audio_layer:
        return False
    ours, theirs = main.network.encoder.state_dict(), assistant.network.encoder.state_dict()
    if ours.keys() != theirs.keys():
        return False
    for name, tensor in ours.items():
        other = theirs[name]
        if tensor.shape != other.shape:
            return False
        if tensor.dtype != other.dtype or tensor.is_mkldnn or other.is_mkldnn:
            tensor, other = tensor.to_dense().float() if tensor.is_mkldnn else tensor.float(), \
                other.to_dense().float() if other.is_mkldnn else other.float()
        if not torch.allclose(tensor, other, atol=atol, rtol=0):
            return False
    return True


def make_assistant(main: SpeechModel, assistant: SpeechModel, draft_length: int | None = None) -> Drafter:
    """The drafter `assistant` makes for `main`, or IncompatibleAssistantError (one line).
    draft_length: a constant γ; None: chosen per round by the adaptive controller."""
    if assistant.dims.n_mels != main.dims.n_mels:
        raise IncompatibleAssistantError(
            f"assistant {assistant.name} reads {assistant.dims.n_mels} mel bins but {main.name} reads {main.dims.n_mels}; "
            "pick an assistant of the same family (e.g. large-v3 with distil-large-v3)")
    if isinstance(assistant.network, DraftNetwork):
        return DistilledDrafter(assistant, draft_length)
    if same_vocabulary(main.tokenizer, assistant.tokenizer):
        return ModelDrafter(assistant, shares_encoder=encoders_match(main, assistant), draft_length=draft_length)
    if assistant.tokenizer.id_of_special("<|0.00|>") is None or main.tokenizer.id_of_special("<|0.00|>") is None:
        raise IncompatibleAssistantError(f"assistant {assistant.name}: its vocabulary has no timestamp tokens")
    return CrossTokenizerDrafter(main.tokenizer, assistant, draft_length)


def load_assistant(main: SpeechModel, name_or_path: str, draft_length: int | None = None) -> Drafter:
    """Load an assistant on the main model's device and dtype and make its drafter.

    name_or_path: a model name, hub id or folder, or a distilled draft's folder (specwhisper.draft_files).
    """
    if draft_folder(name_or_path) is not None:
        return make_assistant(main, load_draft(main, name_or_path), draft_length)
    return make_assistant(main, load_model(name_or_path, device=main.device, dtype=main.dtype), draft_length)


def resolve_auto_assistant(main: SpeechModel, draft_length: int | None = None) -> Drafter | None:
    """`--assistant auto`: the distilled draft made for this main model (under the specwhisper cache,
    or shipped with the package), or None when there is none: then decode without an assistant."""
    folder = find_draft(main)
    return None if folder is None else make_assistant(main, load_draft(main, folder), draft_length)
