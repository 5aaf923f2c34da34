"""Trainer callbacks and plug-ins, one job per module; import from the module that holds the name.

- telemetry: TrainingMonitor: gradient norm, tokens/s and padding efficiency, without a host sync per step.
- report: ConfusionMatrixReport: the test confusion matrix (W&B chart + PNG) and per-class precision and recall.
- nonfinite: NonFiniteLossGuard: stops a run whose loss turned NaN/inf, naming the step, before a bad checkpoint.
- last_checkpoint: LastCheckpoint: last.ckpt every N steps, at each epoch end and on SIGTERM.
- selection: BestCheckpoint: best.ckpt by validation accuracy, ties to the lower loss, and early stopping by the same rule.
- checkpoint_io: AtomicCheckpointIO: a checkpoint on disk is never half-written.
- resume: RestoreLoaderPosition, check_resumable and check_same_batches: a resumed epoch continues with the batch
  after the last one trained on, and a resume whose batches would differ (batch size, world size, seed, data) is
  refused.
"""
