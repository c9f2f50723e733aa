"""The ceiling of drafting on this machine: a drafter that knows the main model's greedy output.

Why: speculative decoding can only shrink the decoder's steps; the encoder, log-mel and prompts
cost the same with any draft. A drafter that proposes exactly the main model's next tokens (so
every draft is accepted) and does no model work at all is the best any draft can be. Running it
through the real speculative loop (specwhisper.speculative, with the adaptive controller choosing
γ) measures, not models, the largest speedup drafting can give on this hardware, with the loop's
own per-round costs (verify passes, rules, bookkeeping).

How: `GreedyRecorder` is a drafter that proposes nothing (so every round is one greedy step, which
gives greedy's tokens bit for bit) and records, per window, the prompt and every token decided;
`OracleDrafter` then proposes, after any recorded prefix, the tokens that followed it. Both are
plain `Drafter`s: nothing in the model or the loop is patched.

Used by `bench_distilled.py --oracle`; temperature 0 (a sampled run has no fixed next token to know).
"""

from __future__ import annotations

from torch import Tensor

from specwhisper.decoding import WindowBatch
from specwhisper.drafters import Drafter, Drafts, Verified


class GreedyRecorder(Drafter):
    """Proposes nothing; `sequences` gets one list per window decoded: its prompt, then every token decided."""

    kind = "recorder"

    def __init__(self):
        super().__init__(draft_length=1)  # a constant γ: there is no cost to learn
        self.sequences: list[list[int]] = []
        self._prompts: list[list[int]] = []
        self._first = 0  # index in `sequences` of the current batch's first row

    def prepare(self, window: WindowBatch, prompt_hidden: Tensor) -> None:
        self._first = len(self.sequences)
        self._prompts = [list(prompt) for prompt in window.prompts]
        self.sequences += [list(prompt) for prompt in window.prompts]

    def propose(self, gamma: int) -> Drafts:
        return Drafts.none(len(self._prompts))

    def verified(self, outcome: Verified) -> None:
        for row, (prompt, tokens) in enumerate(zip(self._prompts, outcome.tokens)):
            self.sequences[self._first + row] = prompt + tokens


def next_token_table(sequences: list[list[int]], eot: int) -> dict[tuple[int, ...], int]:
    """{fed prefix: the token the main model chose after it}, end-of-text after each whole sequence."""
    table: dict[tuple[int, ...], int] = {}
    for sequence in sequences:
        for end in range(1, len(sequence)):
            table[tuple(sequence[:end])] = sequence[end]
        table[tuple(sequence)] = eot
    return table


class OracleDrafter(Drafter):
    """Proposes, after each row's prompt and accepted tokens, the tokens greedy decoding chose there."""

    kind = "oracle"

    def __init__(self, sequences: list[list[int]], eot: int, draft_length: int | None = None):
        super().__init__(draft_length)
        self.table = next_token_table(sequences, eot)
        self.eot = eot

    def learn(self, sequences: list[list[int]]) -> None:
        """Add more recorded windows (another file's), keeping the calibrated costs."""
        self.table.update(next_token_table(sequences, self.eot))

    def prepare(self, window: WindowBatch, prompt_hidden: Tensor) -> None:
        self.prompts = window.prompts

    def sync(self, contexts: list[list[int] | None]) -> None:
        self.contexts = contexts

    def propose(self, gamma: int) -> Drafts:
        drafts = []
        for prompt, context in zip(self.prompts, self.contexts):
            sequence, row = list(prompt) + list(context or []), []
            while context is not None and len(row) < gamma and tuple(sequence) in self.table:
                token = self.table[tuple(sequence)]
                row.append(token)
                sequence.append(token)
                if token == self.eot:
                    break
            drafts.append(row)
        return Drafts(drafts)
