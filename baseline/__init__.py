"""Classical style-transfer baselines the study compares against (run in-process, no ComfyUI)."""
