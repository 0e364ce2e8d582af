"""SparsifierCallback drives a Sparsifier from transformers.Trainer: a tiny ViT, offline, to its target."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from kronsparse import Sparsifier  # noqa: E402
from kronsparse.integrations.hf import STATE_FILE, SparsifierCallback  # noqa: E402


class Images(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 8, 8, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def test_trainer_with_the_callback_ends_at_the_target_with_exact_zero_blocks(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=8, patch_size=4, num_channels=1, num_labels=10)
    model = transformers.ViTForImageClassification(config)
    steps = 24
    sp = Sparsifier(model, "kron", block_shape=(4, 4), rank=2, target_sparsity=0.5, total_steps=steps)
    opt = sp.optimizer(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
                                          report_to=[], save_strategy="steps", save_steps=12, logging_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Images(), optimizers=(opt, None),
                                   callbacks=[SparsifierCallback(sp)])
    trainer.train()
    assert sp.steps == steps
    layers = sp.sparsified_layers()
    assert len(layers) == 6  # query, key, value, attention output, intermediate, output; not the 10-way head
    for name, layer in layers.items():
        W = layer.dense_weight().detach()
        zero = W.reshape(W.shape[0] // 4, 4, W.shape[1] // 4, 4).abs().amax(dim=(1, 3)) == 0
        assert abs(int(zero.sum()) - 0.5 * zero.numel()) <= 1, name
    state = torch.load(tmp_path / "checkpoint-12" / STATE_FILE, weights_only=True)
    assert state["steps"] == 12


def test_a_step_count_mismatch_is_refused(tmp_path):
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    image_size=8, patch_size=4, num_channels=1, num_labels=10)
    model = transformers.ViTForImageClassification(config)
    sp = Sparsifier(model, "kron", block_shape=(4, 4), rank=1, target_sparsity=0.5, total_steps=100)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=10, report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Images(),
                                   optimizers=(sp.optimizer(torch.optim.AdamW, lr=1e-3), None),
                                   callbacks=[SparsifierCallback(sp)])
    with pytest.raises(ValueError, match="total_steps=100"):
        trainer.train()


def _vit_trainer(tmp_path, steps, callbacks_for, save_steps=6):
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=8, patch_size=4, num_channels=1, num_labels=10, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    model = transformers.ViTForImageClassification(config)
    sp = Sparsifier(model, "kron", block_shape=(4, 4), rank=2, target_sparsity=0.5, total_steps=steps)
    opt = sp.optimizer(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
                                          report_to=[], save_strategy="steps", save_steps=save_steps,
                                          logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Images(), optimizers=(opt, None),
                                   callbacks=callbacks_for(sp))
    return model, sp, trainer


def test_the_callback_restores_the_sparsifier_when_the_trainer_resumes(tmp_path):
    steps = 12
    _, _, trainer = _vit_trainer(tmp_path, steps, lambda sp: [SparsifierCallback(sp)])
    trainer.train()
    saved = torch.load(tmp_path / "checkpoint-6" / STATE_FILE, weights_only=True)
    seen = {}

    class Spy(transformers.TrainerCallback):  # runs after the SparsifierCallback's on_train_begin
        def __init__(self, sp):
            self.sp = sp

        def on_train_begin(self, args, state, control, **kwargs):
            seen.update(self.sp.state_dict())

    _, sp2, trainer2 = _vit_trainer(tmp_path, steps, lambda sp: [SparsifierCallback(sp), Spy(sp)])
    trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert seen["steps"] == 6 and seen["method"]["lams"] == saved["method"]["lams"]
    assert all(torch.equal(a, b) for a, b in zip(seen["method"]["masks"], saved["method"]["masks"]))
    assert sp2.steps == steps  # before: restarted at 0 without a word, and ended at 6
    assert set(sp2.layer_sparsity().values()) == {0.5}


def test_a_resume_without_the_sparsifier_state_is_refused(tmp_path):
    steps = 12
    _, _, trainer = _vit_trainer(tmp_path, steps, lambda sp: [SparsifierCallback(sp)])
    trainer.train()
    (tmp_path / "checkpoint-6" / STATE_FILE).unlink()
    _, _, trainer2 = _vit_trainer(tmp_path, steps, lambda sp: [SparsifierCallback(sp)])
    with pytest.raises(ValueError, match="resumes at step 6 but the Sparsifier is at step 0"):
        trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
