"""Training a draft on the teacher's outputs: batches, the loss, validation, the epoch loop.

AdamW on the draft's own tensors only. Teacher forcing on the teacher's tokens with the stored
encoder output (no encoder pass during training), loss = KL(teacher top-k || draft) +
ce_weight x cross-entropy on the teacher's greedy token (+ hidden_weight x a hidden-state term).
Validation after each epoch reports the KL and the argmax agreement with the teacher (the logit
rules applied to the draft too: the expected acceptance rate per drafted token); early stopping
on agreement; a checkpoint per epoch (`--resume` continues).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..draft import DraftNetwork, shift_features
from .progress import progress_bar
from .teacher import TeacherWindow, fill_hidden, rules_for

if TYPE_CHECKING:
    from ..speech_model import SpeechModel


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.01
    batch_size: int = 8  # windows per step
    ce_weight: float = 0.5  # cross-entropy on the teacher's greedy token, added to the KL
    hidden_weight: float = 0.0  # matching the main model's final hidden states, added too
    feedback_weight: float = 1.0  # feature drafts: the loss of a second pass fed the draft's own hidden states
    patience: int = 2  # epochs without a better validation agreement before stopping
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class EpochReport:
    epoch: int
    train_loss: float
    val_kl: float
    val_agreement: float
    seconds: float


@dataclass
class TrainResult:
    history: list[EpochReport] = field(default_factory=list)
    best_epoch: int = 0
    best_agreement: float = 0.0
    initial_agreement: float = 0.0
    initial_kl: float = 0.0

    @classmethod
    def from_dict(cls, data: dict) -> "TrainResult":
        return cls(history=[EpochReport(**e) for e in data["history"]],
                   **{k: v for k, v in data.items() if k != "history"})


@dataclass
class Batch:
    tokens: Tensor  # (B, T) long, right-padded
    features: Tensor  # (B, S, C)
    rows: Tensor  # (N,) batch row of each target position
    positions: Tensor  # (N,) its position
    targets: Tensor  # (N,) long
    topk_ids: Tensor  # (N, k) long
    topk_probs: Tensor  # (N, k) float, renormalized teacher probabilities
    hidden: Tensor | None  # (N, C) the main model's final hidden states, when every window has them
    first_targets: list[int]  # per row: the position whose output predicts the first generated token
    context_in: Tensor | None = None  # (B, T, C) a feature draft's input: the main model's hidden state one position back


def make_batch(windows: list[TeacherWindow], pad: int, device, dtype) -> Batch:
    longest = max(len(w.tokens) for w in windows)
    tokens = torch.full((len(windows), longest), pad, dtype=torch.long)
    rows, positions = [], []
    for r, w in enumerate(windows):
        tokens[r, :len(w.tokens)] = w.tokens.long()
        positions.append(torch.arange(w.first_target, w.first_target + w.n_targets))
        rows.append(torch.full((w.n_targets,), r))
    logprobs = torch.cat([w.topk_logprobs for w in windows]).float()
    return Batch(tokens=tokens.to(device), features=torch.stack([w.features for w in windows]).to(device, dtype),
                 rows=torch.cat(rows).to(device), positions=torch.cat(positions).to(device),
                 targets=torch.cat([w.targets for w in windows]).long().to(device),
                 topk_ids=torch.cat([w.topk_ids for w in windows]).long().to(device),
                 topk_probs=torch.softmax(logprobs, dim=-1).to(device),
                 hidden=torch.cat([w.hidden for w in windows]).to(device, torch.float32)
                 if all(w.hidden is not None for w in windows) else None,
                 first_targets=[w.first_target for w in windows],
                 context_in=_context_input(windows, longest, device, dtype))


def _context_input(windows: list[TeacherWindow], longest: int, device, dtype) -> Tensor | None:
    if not all(w.context is not None for w in windows):
        return None
    context = torch.zeros(len(windows), longest, windows[0].context.shape[-1])
    for r, w in enumerate(windows):
        context[r, :len(w.tokens)] = w.context.float()
    return shift_features(context).to(device, dtype)  # position t reads the hidden state of t - 1


def own_feedback_input(hidden: Tensor, batch: Batch) -> Tensor:
    """A feature draft's input when it drafts its second token and beyond: at generated positions
    its own previous hidden state stands in for the main model's (which verification has not
    computed yet); at prompt positions the main model's stays. hidden: (B, T, C) from a first pass."""
    own = shift_features(hidden.detach())
    generated = torch.arange(hidden.shape[1], device=hidden.device)[None] > \
        torch.tensor(batch.first_targets, device=hidden.device)[:, None]  # (B, T): t - 1 >= first target
    return torch.where(generated[..., None], own, batch.context_in)


def batch_loss(network: DraftNetwork, batch: Batch, ce_weight: float, hidden_weight: float = 0.0, feedback_weight: float = 0.0
               ) -> Tensor:
    """The training loss, with gradients.

    A feature draft is trained on the main model's hidden states (what its first drafted token sees)
    and, with feedback_weight, on a second pass fed its own (what later drafted tokens see)."""
    audio_kv = network.decoder.audio_kv(batch.features)
    context = batch.context_in if network.decoder.reads_features else None
    if network.decoder.reads_features and context is None:
        raise ValueError("a feature draft needs the main model's hidden states (fill_hidden(..., context=True))")
    hidden = network.decoder(batch.tokens, audio_kv, features=context)  # (B, T, C): teacher forcing, no cache
    loss, _ = _loss_terms(network, hidden[batch.rows, batch.positions], batch, ce_weight, hidden_weight)
    if context is not None and feedback_weight:
        fed_back = network.decoder(batch.tokens, audio_kv, features=own_feedback_input(hidden, batch))
        loss2, _ = _loss_terms(network, fed_back[batch.rows, batch.positions], batch, ce_weight, hidden_weight)
        loss = (loss + feedback_weight * loss2) / (1 + feedback_weight)
    return loss


@torch.no_grad()
def validate(main: SpeechModel, network: DraftNetwork, windows: list[TeacherWindow], batch_size: int = 8
             ) -> tuple[float, float, dict]:
    """(mean KL, agreement, details) on these windows. Agreement applies the logit rules to the
    draft's logits at every position, as drafting does, and compares with the teacher's greedy token."""
    if not windows:
        return float("nan"), float("nan"), {}
    rules = {ts: rules_for(main, ts) for ts in (False, True)}
    was_training = network.training
    network.eval()
    kl_sum, n, agree, agree_fed_back = 0.0, 0, 0, 0
    per_language: dict[str, list[int]] = {}
    features = network.decoder.reads_features
    if features:
        fill_hidden(main, windows, context=True)

    def hits_of(hidden: Tensor, r: int, w: TeacherWindow) -> int:
        positions = torch.arange(w.first_target, w.first_target + w.n_targets, device=hidden.device)
        logits = network.decoder.logits(hidden[r, positions]).float()  # (N, V), -inf outside a shortlist
        generated = w.generated
        hits = 0
        for j, target in enumerate(w.targets.tolist()):
            filtered = rules[w.spec.timestamps].apply(logits[j], generated[:j])
            hits += int(filtered.argmax()) == target
        return hits

    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        batch = make_batch(chunk, main.tokenizer.eot, main.device, main.dtype)
        audio_kv = network.decoder.audio_kv(batch.features)
        hidden = network.decoder(batch.tokens, audio_kv, features=batch.context_in if features else None)
        _, kl = _loss_terms(network, hidden[batch.rows, batch.positions], batch, ce_weight=0.0)
        kl_sum += float(kl.sum())
        n += len(kl)
        fed_back = None
        if features:  # the second drafted token onwards: the draft's own hidden state fed back
            fed_back = network.decoder(batch.tokens, audio_kv, features=own_feedback_input(hidden, batch))
        for r, w in enumerate(chunk):
            hits = hits_of(hidden, r, w)
            agree += hits
            if fed_back is not None:
                agree_fed_back += hits_of(fed_back, r, w)
            counts = per_language.setdefault(w.language, [0, 0])
            counts[0] += hits
            counts[1] += w.n_targets
    network.train(was_training)
    details = {"positions": n, "per_language": {k: v[0] / max(v[1], 1) for k, v in sorted(per_language.items())}}
    if features:
        # Agreement with the main model's hidden states is the first drafted token's; fed back,
        # the later ones'. The score is their mean (γ ≈ 2-4 drafts a round mostly the latter).
        details["agreement_first"] = agree / max(n, 1)
        details["agreement_fed_back"] = agree_fed_back / max(n, 1)
        return kl_sum / max(n, 1), (agree + agree_fed_back) / max(2 * n, 1), details
    return kl_sum / max(n, 1), agree / max(n, 1), details


def _loss_terms(network: DraftNetwork, target_hidden: Tensor, batch: Batch, ce_weight: float, hidden_weight: float = 0.0
                ) -> tuple[Tensor, Tensor]:
    """KL(teacher top-k || draft) per position, plus ce_weight x cross-entropy on the greedy token,
    plus hidden_weight x the squared distance between the draft's and the main model's final hidden
    states relative to the latter's norm (a 512-number target per token instead of one distribution).

    A shortlist head can only score its own tokens: teacher mass outside it is dropped (the
    rest renormalized) and positions whose greedy token lies outside get no cross-entropy.
    """
    logq, short_ids = network.decoder.log_probs(target_hidden)
    teacher_ids, teacher_p, targets = batch.topk_ids, batch.topk_probs, batch.targets
    if short_ids is not None:
        slot = torch.full((network.dims.n_vocab,), -1, dtype=torch.long, device=logq.device)
        slot[short_ids] = torch.arange(len(short_ids), device=logq.device)
        teacher_ids, targets = slot[teacher_ids], slot[targets]
        teacher_p = teacher_p * (teacher_ids >= 0)
        teacher_p = teacher_p / teacher_p.sum(-1, keepdim=True).clamp_min(1e-12)
        teacher_ids = teacher_ids.clamp_min(0)
    kl = (teacher_p * (torch.log(teacher_p.clamp_min(1e-12)) - logq.gather(-1, teacher_ids))).sum(-1)  # (N,)
    valid = targets >= 0
    ce = -logq.gather(-1, targets.clamp_min(0)[:, None])[:, 0]
    loss = kl.mean() + ce_weight * (ce * valid).sum() / valid.sum().clamp_min(1)
    if hidden_weight and batch.hidden is not None:
        distance = (target_hidden.float() - batch.hidden).square().sum(-1) / batch.hidden.square().sum(-1)
        loss = loss + hidden_weight * distance.mean()
    return loss, kl.detach()


CHECKPOINT_FILE = "checkpoint.pt"


def train(main: SpeechModel, network: DraftNetwork, train_windows: list[TeacherWindow],
          val_windows: list[TeacherWindow], options: TrainOptions, checkpoint_dir: Path | None = None,
          resume: bool = False, progress: bool = True, on_best=None, log=print) -> TrainResult:
    """Train the draft's own parameters in place; at the end they hold the best validation epoch's values.

    checkpoint_dir: where `checkpoint.pt` (own weights, optimizer, epoch, history) is written after
    every epoch; with `resume`, training continues from it. on_best(network, result): called when
    validation agreement improves (e.g. to save the draft).
    """
    steps_per_epoch = math.ceil(len(train_windows) / options.batch_size)
    optimizer, scheduler = make_optimizer(network, options, steps_per_epoch * options.epochs)
    checkpoint = checkpoint_dir / CHECKPOINT_FILE if checkpoint_dir else None
    if resume and checkpoint is not None and checkpoint.is_file():
        result, best_state, stale, start_epoch = load_checkpoint(checkpoint, network, optimizer, scheduler)
        log(f"resumed from {checkpoint} after epoch {start_epoch - 1} "
            f"(best agreement {100 * result.best_agreement:.1f}% at epoch {result.best_epoch})")
    else:
        result, best_state, stale, start_epoch = TrainResult(), None, 0, 1
        result.initial_kl, result.initial_agreement, _ = validate(main, network, val_windows)
        log(f"before training: validation KL {result.initial_kl:.3f}, agreement {100 * result.initial_agreement:.1f}%")
    for epoch in range(start_epoch, options.epochs + 1):
        started = time.perf_counter()
        order = list(range(len(train_windows)))
        random.Random(options.seed * 1000 + epoch).shuffle(order)  # the same order after a resume
        bar = progress_bar(steps_per_epoch, f"epoch {epoch}/{options.epochs}", progress)
        train_loss = run_epoch(main, network, [train_windows[j] for j in order], optimizer, scheduler, options, bar)
        val_kl, val_agreement, details = validate(main, network, val_windows)
        report = EpochReport(epoch, train_loss, val_kl, val_agreement, time.perf_counter() - started)
        result.history.append(report)
        improved = not val_windows or val_agreement > result.best_agreement
        log(epoch_line(report, details) + (" | best" if improved else ""))
        if improved:
            result.best_epoch, result.best_agreement, stale = epoch, val_agreement, 0
            best_state = {k: v.cpu().clone() for k, v in network.own_state_dict().items()}
            if on_best is not None:
                on_best(network, result)
        else:
            stale += 1
        if checkpoint is not None:
            save_checkpoint(checkpoint, network, optimizer, scheduler, result, best_state, stale, epoch)
        if val_windows and stale >= options.patience:
            log(f"early stop: no better agreement for {stale} epochs")
            break
    if best_state is not None:
        network.load_own_state(best_state)
    network.eval()
    return result


def make_optimizer(network: DraftNetwork, options: TrainOptions, total_steps: int):
    """AdamW on the draft's own parameters; the learning rate warms up linearly, then follows a cosine
    down to 10 %."""
    optimizer = torch.optim.AdamW(network.own_parameters(), lr=options.lr, weight_decay=options.weight_decay)
    total_steps = max(total_steps, 1)

    def lr_factor(step: int) -> float:
        if step < options.warmup_steps:
            return (step + 1) / options.warmup_steps
        done = (step - options.warmup_steps) / max(total_steps - options.warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def run_epoch(main: SpeechModel, network: DraftNetwork, windows: list[TeacherWindow], optimizer, scheduler,
              options: TrainOptions, bar) -> float:
    """One pass over `windows` in batches; returns the mean training loss."""
    network.train()
    loss_sum, n_steps = 0.0, 0
    for i in range(0, len(windows), options.batch_size):
        batch = make_batch(windows[i:i + options.batch_size], main.tokenizer.eot, main.device, main.dtype)
        loss = batch_loss(network, batch, options.ce_weight, options.hidden_weight, options.feedback_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.own_parameters(), options.max_grad_norm)
        optimizer.step()
        scheduler.step()
        loss_sum += float(loss.detach())
        n_steps += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum / n_steps:.3f}")
    bar.close()
    network.eval()
    return loss_sum / max(n_steps, 1)


def epoch_line(report: EpochReport, details: dict) -> str:
    per_language = " ".join(f"{k}:{100 * v:.0f}%" for k, v in details.get("per_language", {}).items())
    if "agreement_first" in details:
        per_language = (f"first draft {100 * details['agreement_first']:.1f}%, later drafts "
                        f"{100 * details['agreement_fed_back']:.1f}%; {per_language}")
    return (f"epoch {report.epoch}: train loss {report.train_loss:.3f} | validation KL {report.val_kl:.3f}, "
            f"agreement {100 * report.val_agreement:.1f}% ({per_language}) | {report.seconds:.0f} s")


def save_checkpoint(path: Path, network: DraftNetwork, optimizer, scheduler, result: TrainResult, best_state,
                    stale: int, epoch: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"own_state": {k: v.cpu() for k, v in network.own_state_dict().items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "result": asdict(result),
                "best_state": best_state, "stale": stale, "epoch": epoch}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, network: DraftNetwork, optimizer, scheduler):
    """Restore the draft, optimizer and schedule; returns (result, best_state, stale epochs, next epoch)."""
    # weights_only: tensors, numbers and plain containers only, never arbitrary objects.
    saved = torch.load(path, map_location="cpu", weights_only=True)
    network.load_own_state(saved["own_state"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return TrainResult.from_dict(saved["result"]), saved["best_state"], saved["stale"], saved["epoch"] + 1
