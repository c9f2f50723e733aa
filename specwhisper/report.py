"""Human-readable statistics and per-token traces, for stderr."""

from __future__ import annotations

from .tokenizer import Tokenizer

GREEN, YELLOW, RESET = "\033[32m", "\033[33m", "\033[0m"


def format_stats(name: str, result) -> str:
    s = result.stats
    parts = [f"{name}: {s.generated_tokens} tokens in {s.main_passes} main passes"
             f" ({s.tokens_per_main_pass:.2f} tokens/pass)"]
    if s.drafted:
        parts.append(f"drafted {s.drafted}, accepted {s.accepted} ({100 * s.acceptance_rate:.1f}%)")
    if s.free_drafted:
        parts.append(f"of which free {s.free_drafted}, accepted {s.free_accepted}")
    parts.append(f"encoder {s.encoder_seconds * 1e3:.0f} ms")
    if s.drafted:
        parts.append(f"draft {s.draft_seconds * 1e3:.0f} ms, verify {s.verify_seconds * 1e3:.0f} ms")
    else:
        parts.append(f"decode {(s.prefill_seconds + s.decode_seconds) * 1e3:.0f} ms")
    return "; ".join(parts)


def format_trace(tokenizer: Tokenizer, result, color: bool) -> str:
    """Each token on its own; drafted-and-accepted tokens green, the main model's own tokens yellow.

    Without color: accepted draft tokens are wrapped in [..], the main model's in {..}.
    """
    mask = result.draft_mask or [False] * len(result.tokens)
    pieces = []
    for token, drafted in zip(result.tokens, mask):
        text = tokenizer.special_name(token) or tokenizer.token_bytes(token).decode("utf-8", errors="replace")
        if color:
            pieces.append(f"{GREEN if drafted else YELLOW}{text}{RESET}")
        else:
            pieces.append(f"[{text}]" if drafted else f"{{{text}}}")
    legend = "(green: drafted and accepted; yellow: from the main model)" if color else \
        "([..]: drafted and accepted; {..}: from the main model)"
    return "".join(pieces) + "\n" + legend
