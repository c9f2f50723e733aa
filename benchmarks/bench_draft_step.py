"""What one drafted token costs: the shipped draft in PyTorch against the same draft in C (kernels/cpu_draft.c).

    python benchmarks/bench_draft_step.py

On the first window of ../shared/audio/long, after the prompt: the draft's decoder step for one token,
its next-token choice (shortlist head, Whisper's rules on the logits, argmax), and whole rounds (the
sync that feeds the accepted text, then γ = 1, 4, 8 drafted tokens). "PyTorch" is the draft as its
modules run it (int8 linears through PyTorch's dynamic quantization, rules over the 51,865-entry
vector), "C" the fused kernel. The two alternate, medians of 100 runs each.
"""

from __future__ import annotations

import statistics
import time

import torch

from common import print_table, read_manifest
from specwhisper import audio, load_model
from specwhisper.assistants import resolve_auto_assistant
from specwhisper.decoding import DecodingOptions, LogitRules, WindowBatch, begin_window, build_prompts
from specwhisper.transcription import encode_audio


def median_ms(run, repeats: int = 100) -> float:
    for _ in range(10):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> None:
    torch.set_grad_enabled(False)
    model = load_model("base", device="cpu", dtype="float32")
    drafter = resolve_auto_assistant(model, draft_length=4)
    if drafter is None or drafter.model.network.decoder.kernel is None:
        raise SystemExit("no shipped draft, or its C kernel is unavailable here")
    samples = audio.load_audio(read_manifest("long")[0]["path"])
    mel = audio.first_window_mel(samples, model.dims.n_mels)[None]
    audio_kv, features = encode_audio(model, mel)
    options = DecodingOptions(language="en", timestamps=True)
    rules = LogitRules(model.tokenizer, model.suppress_tokens, model.begin_suppress_tokens, options, model.dims.n_vocab)
    window = WindowBatch(mel, features, audio_kv, build_prompts(model.tokenizer, options, ["en"]), ["en"], rules,
                         options)
    decoder, kernel = drafter.model.network.decoder, drafter.model.network.decoder.kernel
    state = begin_window(model.network, model.tokenizer, window)
    drafter.prepare(window, state.prompt_hidden)
    context = [state.rows[0].tokens]
    drafter.sync(context)
    drafter._catch_up()
    hidden, start = drafter.last_hidden, list(drafter.cache.lengths)

    def step() -> None:
        decoder(torch.tensor([[220]]), drafter.audio_kv, drafter.cache, features=hidden[:, None])
        drafter.cache.rollback(start)

    def choose() -> None:
        logits = decoder.logits(hidden).float()[0]
        int(drafter.rules.apply(logits, context[0]).argmax())

    def round_of(gamma: int):
        def run() -> None:
            drafter.sync(context)
            drafter.propose(gamma)
        return run

    rows = {}
    for _ in range(2):
        for label, use_kernel in (("PyTorch", False), ("C", True)):
            decoder.kernel, drafter.fused = (kernel, True) if use_kernel else (None, False)
            costs = {"step": median_ms(step)}
            if not use_kernel:
                costs["choice"] = median_ms(choose)
            costs.update({f"round γ={g}": median_ms(round_of(g), 50) for g in (1, 4, 8)})
            rows.setdefault(label, []).append(costs)
    decoder.kernel, drafter.fused = kernel, True
    names = list(rows["PyTorch"][0])
    table = [[name] + [f"{statistics.median(r[name] for r in rows[label] if name in r):.2f}"
                       if any(name in r for r in rows[label]) else "(in the round)" for label in ("PyTorch", "C")]
             for name in names]
    print_table(["ms", "PyTorch", "C"], table)
    for label in ("PyTorch", "C"):
        four, eight = (statistics.median(r[f"round γ={g}"] for r in rows[label]) for g in (4, 8))
        print(f"{label}: {(eight - four) / 4:.2f} ms per extra drafted token (rounds of 4 and 8)")


if __name__ == "__main__":
    main()
