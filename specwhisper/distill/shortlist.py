"""The tokens a shortlist draft head may propose, chosen from the teacher's outputs."""

from __future__ import annotations

from collections import Counter

from torch import Tensor

from .teacher import TeacherWindow


def choose_shortlist(tokenizer, windows: list[TeacherWindow], size: int) -> list[int]:
    """The `size` tokens the draft may propose: the main model's likeliest outputs, best first.

    Always end-of-text and every timestamp token (timestamp mode emits them constantly; they cost
    1,501 rows). Then the text tokens the teacher emitted, most frequent first. Then the remaining
    text tokens in id order: byte-pair merge order, a frequency prior for text never seen in
    training (how well each ranking covers unseen speech: docs/drafts.md).
    """
    chosen = [tokenizer.eot] + list(range(tokenizer.timestamp_begin, tokenizer.n_vocab))
    if size <= len(chosen):
        raise ValueError(f"a shortlist needs more than {len(chosen)} tokens (end-of-text and the timestamps)")
    emitted = Counter(t for w in windows for t in w.targets.tolist() if t < tokenizer.eot)
    seen = set(chosen)
    for token in [t for t, _ in emitted.most_common()] + list(range(tokenizer.eot)):
        if len(chosen) >= size:
            break
        if token not in seen:
            chosen.append(token)
            seen.add(token)
    return chosen


def shortlist_coverage(ids: list[int] | Tensor, windows: list[TeacherWindow]) -> float:
    """Fraction of the teacher's greedy tokens the shortlist can propose."""
    allowed = set(int(i) for i in ids)
    targets = [t for w in windows for t in w.targets.tolist()]
    return sum(t in allowed for t in targets) / max(len(targets), 1)


def coverage_line(shortlist, train_windows: list[TeacherWindow], val_windows: list[TeacherWindow]) -> str:
    return (f"covers {100 * shortlist_coverage(shortlist, train_windows):.1f}% of training and "
            f"{100 * shortlist_coverage(shortlist, val_windows):.1f}% of validation greedy tokens")
