"""The transformers Trainer and Lightning callbacks, with the real trainers on a tiny model (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsearch as sa
from sparsearch.integrations import STATE_FILE

transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.body(inputs)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def examples(count: int = 64) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(count, 16, generator=generator)
    y = (x[:, :4].argmax(1)).long()
    return [{"inputs": x[i], "labels": y[i]} for i in range(count)]


def hf_trainer(output_dir, callback, max_steps=8):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=0.05,
        save_steps=4,
        logging_steps=1000,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return Trainer(model=Classifier(), args=args, train_dataset=examples(), callbacks=[callback])


def rigl(total_steps: int) -> sa.RigL:
    return sa.RigL(0.8, update_every=2, total_steps=total_steps, distribution="uniform", seed=0)


def test_transformers_trainer_counts_optimizer_steps_saves_and_resumes(tmp_path):
    from sparsearch.integrations.transformers import SparsifierCallback

    callback = SparsifierCallback(rigl)
    trainer = hf_trainer(tmp_path, callback)
    trainer.train()
    sparsifier = callback.sparsifier
    # 8 optimizer steps of 2 accumulated batches each: the schedule runs in optimizer steps
    assert sparsifier.step == 8
    assert sparsifier.updates == 2  # steps 2 and 4 (updates stop at 0.75 * 8 = 6)
    assert sparsifier.overall_sparsity() == pytest.approx(0.8, abs=1e-3)
    for step in (4, 8):
        assert (tmp_path / f"checkpoint-{step}" / STATE_FILE).is_file()
    final = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}

    resumed_callback = SparsifierCallback(rigl)
    resumed = hf_trainer(tmp_path, resumed_callback)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    again = resumed_callback.sparsifier
    assert again.step == 8 and again.updates == 2
    for name, mask in sparsifier.masks.items():
        assert torch.equal(again.masks[name], mask), name
    for name, param in resumed.model.named_parameters():
        assert torch.allclose(param, final[name], atol=1e-6), name


def test_transformers_resume_without_sparsifier_state_is_refused(tmp_path):
    from sparsearch.integrations.transformers import SparsifierCallback

    hf_trainer(tmp_path, SparsifierCallback(rigl)).train()
    (tmp_path / "checkpoint-4" / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no sparsifier state"):
        hf_trainer(tmp_path, SparsifierCallback(rigl)).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


class LitClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Classifier()

    def training_step(self, batch, batch_index):
        return self.net(*batch)["loss"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def lightning_run(tmp_path, callback, max_steps, ckpt_path=None):
    torch.manual_seed(0)
    data = examples()
    loader = torch.utils.data.DataLoader(
        [(d["inputs"], d["labels"]) for d in data], batch_size=4, shuffle=False, num_workers=0
    )
    module = LitClassifier()
    trainer = pl.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=2,
        callbacks=[callback],
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer, module


def test_lightning_callback_counts_optimizer_steps_saves_and_resumes(tmp_path):
    from sparsearch.integrations.lightning import SparsifierCallback

    callback = SparsifierCallback(lambda total: rigl(8))
    trainer, _ = lightning_run(tmp_path, callback, max_steps=3)
    sparsifier = callback.sparsifier
    assert sparsifier.step == 3 and sparsifier.updates == 1  # 6 batches, accumulated by 2: 3 optimizer steps
    masks = {name: mask.clone() for name, mask in sparsifier.masks.items()}
    trainer.save_checkpoint(tmp_path / "half.ckpt")

    resumed_callback = SparsifierCallback(lambda total: rigl(8))
    lightning_run(tmp_path, resumed_callback, max_steps=4, ckpt_path=tmp_path / "half.ckpt")
    again = resumed_callback.sparsifier
    assert again.step == 4  # 3 restored + 1 new optimizer step
    assert again.updates == 1  # restored; step 3 is not an update step
    for name, mask in masks.items():
        assert torch.equal(again.masks[name], mask), name  # resumed with the checkpoint's masks, not new ones
    assert again.overall_sparsity() == pytest.approx(0.8, abs=1e-3)
