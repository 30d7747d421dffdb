"""Full-parameter fine-tuning with Ray Train + DeepSpeed (see the trainer issue)."""
