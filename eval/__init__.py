"""Evaluation metrics shared by the StyleMetrics node, the trainer's perceptual losses and `stylora eval`."""
