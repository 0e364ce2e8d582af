"""Drive a kronsparse Sparsifier from a Hugging Face `transformers.Trainer` (extra: kronsparse[hf]).

    sp = Sparsifier(model, "kron", block_shape=(4, 4), rank=4, target_sparsity=0.5, total_steps=max_steps)
    opt = sp.optimizer(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
    trainer = Trainer(model=model, args=TrainingArguments(..., max_steps=max_steps), optimizers=(opt, None),
                      callbacks=[SparsifierCallback(sp)], ...)
    trainer.train()   # sp.step after every optimizer step, sp.finalize at the end

Build the Sparsifier before the Trainer (it swaps layers) and give the Trainer the optimizer
`sp.optimizer(...)` builds, so S, biases and norms get no weight decay and the Kronecker factors
their own learning rate. Each checkpoint folder gets the Sparsifier's state as `sparsifier.pt`.
`trainer.train(resume_from_checkpoint=...)` restores it: when the Trainer starts at step N > 0 and
the Sparsifier is not at N, the callback loads `checkpoint-N/sparsifier.pt` from the output folder
(or from `TrainingArguments.resume_from_checkpoint`), and refuses to go on if none is there or the
steps still differ: a sparsity schedule restarted at step 0 would run without a word otherwise.
(Method "select" changes the model's structure: resume it by hand, `sp.load_state_dict(state,
optimizer)` before the model's and the optimizer's state, as for a plain training loop.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from ..atomic import atomic_write
from ..sparsifier import Sparsifier

STATE_FILE = "sparsifier.pt"


class SparsifierCallback(TrainerCallback):
    """Calls `sparsifier.step(optimizer)` after every optimizer step and `finalize` when training ends."""

    def __init__(self, sparsifier: Sparsifier) -> None:
        self.sparsifier = sparsifier

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.max_steps and state.max_steps != self.sparsifier.total_steps:
            raise ValueError(f"the Trainer will take {state.max_steps} optimizer steps but the Sparsifier was built "
                             f"for total_steps={self.sparsifier.total_steps}; set TrainingArguments(max_steps=...) "
                             "or build the Sparsifier with the Trainer's number of steps")
        if state.global_step != self.sparsifier.steps:
            self._restore(args, state.global_step, optimizer)

    def _restore(self, args, step: int, optimizer) -> None:
        """The Sparsifier's state of the checkpoint the Trainer resumes from (at `step`)."""
        folders = [Path(args.output_dir) / f"checkpoint-{step}"]
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            folders.insert(0, Path(args.resume_from_checkpoint))
        path = next((f / STATE_FILE for f in folders if (f / STATE_FILE).is_file()), None)
        if path is not None:
            saved = torch.load(path, weights_only=True)
            if isinstance(saved, dict) and saved.get("steps") == step:
                self.sparsifier.load_state_dict(saved, optimizer)
        if self.sparsifier.steps != step:
            raise ValueError(f"the Trainer resumes at step {step} but the Sparsifier is at step {self.sparsifier.steps} "
                             f"and no {STATE_FILE} of step {step} was found in {' or '.join(map(str, folders))}: load "
                             "the checkpoint's sparsifier state with sp.load_state_dict(torch.load(path)) first")

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            raise ValueError("SparsifierCallback needs the Trainer's optimizer (transformers >= 4.50 passes it)")
        if self.sparsifier.steps != state.global_step - 1:
            raise ValueError(f"the Trainer is at step {state.global_step} but the Sparsifier at {self.sparsifier.steps}: "
                             "one SparsifierCallback per Sparsifier, stepped only by it")
        self.sparsifier.step(optimizer)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self.sparsifier.finalize(optimizer)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            atomic_write(folder / STATE_FILE, lambda tmp: torch.save(self.sparsifier.state_dict(), tmp))
