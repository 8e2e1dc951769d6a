"""Training: the loop every training stage shares, its parts (optimizers, batches, checkpoints,
parallelism), and the pretrain, finetune and sft stages."""
