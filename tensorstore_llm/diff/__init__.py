"""Fine-tuning diffs: delta-stored checkpoints, delta codecs, apply / transfer, statistics."""
