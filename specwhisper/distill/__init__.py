"""`specwhisper distill`: teach a shallow draft (`specwhisper.draft`) the main model's next token.

    specwhisper distill --main base --audio ../shared/audio/dev ../shared/audio/multilingual \\
                        --layers 2 --head shortlist --out drafts/base-2

Steps, each a module usable alone, in the order they run (`recipe.distill` chains them):
  1. `data`: audio files -> training windows (<= 30 s), stretched by augmentation, split into
     train and validation files before augmentation;
  2. `teacher`: the main model transcribes every window once, greedily, exactly as decoding will,
     keeping its top-k log-probabilities per position (cached on disk, reused by later runs);
  3. `shortlist`: the tokens a shortlist head may propose, from the teacher's outputs;
  4. `train`: the draft's own tensors learn the teacher's distributions (KL + cross-entropy),
     validated by argmax agreement after each epoch, with early stopping and checkpoints;
  5. `recipe.evaluate_agreement`: the same agreement on recordings never trained on.

The teacher (the main model) is never modified: the draft's shared embeddings and encoder are
read through `.detach()` and only the draft's own parameters reach the optimizer. The recipe
that made the shipped draft, and its results: docs/drafts.md.
"""

from .recipe import DistillOptions, distill

__all__ = ["DistillOptions", "distill"]
