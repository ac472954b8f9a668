"""Training from a teacher-logit cache with the Hugging Face ``Trainer``.

``DistillTrainer`` is a ``transformers.Trainer`` whose loss is ``distill.losses.distill_loss``
(α · sparse KD + (1 − α) · hard-label CE, temperature T) on batches from
``DistillDataset`` + ``collate_sparse``. The sparse target tensors are taken out of the batch
before the model's forward, so any causal LM works unchanged::

    from transformers import TrainingArguments
    from tensorstore_llm.distill.dataset import DistillDataset, collate_sparse
    from tensorstore_llm.distill.trainer import distill_trainer

    trainer = distill_trainer(student, TrainingArguments("out", max_steps=100, per_device_train_batch_size=8,
                                                         report_to=[]),
                              train_dataset=DistillDataset("kd-cache", tokenizer=tokenizer),
                              alpha=1.0, temperature=1.0)
    trainer.train()

(``transformers`` is imported only when a trainer is made.)
"""
from __future__ import annotations

from .dataset import collate_sparse
from .losses import distill_loss

TARGET_KEYS = ("target_ids", "target_weights", "target_mask")


def distill_trainer(model, args, *, train_dataset, alpha: float = 1.0, temperature: float = 1.0, kind: str = "kl",
                    **trainer_kwargs):
    """A ``transformers.Trainer`` training ``model`` on a distillation cache.

    Args:
        model: the student (any transformers causal LM).
        args: ``transformers.TrainingArguments`` (``remove_unused_columns`` is set to False).
        train_dataset: a :class:`~tensorstore_llm.distill.dataset.DistillDataset`.
        alpha / temperature / kind: passed to ``distill_loss``.
        trainer_kwargs: anything else ``Trainer`` accepts (callbacks, optimizers, ...).
    Returns:
        The trainer (call ``.train()``).
    """
    from transformers import Trainer

    class DistillTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            batch = {k: inputs.pop(k) for k in TARGET_KEYS}
            batch["labels"] = inputs.pop("labels")
            outputs = model(**inputs)
            loss = distill_loss(outputs.logits, batch, alpha=alpha, temperature=temperature, kind=kind)
            return (loss, outputs) if return_outputs else loss

    args.remove_unused_columns = False   # the target tensors are not forward() arguments, but the loss needs them
    trainer_kwargs.setdefault("data_collator", collate_sparse)
    return DistillTrainer(model=model, args=args, train_dataset=train_dataset, **trainer_kwargs)
