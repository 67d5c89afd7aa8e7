"""Fine-tuning of DCP models with Lightning: schedules, the sparsity controller, the LightningModule."""
