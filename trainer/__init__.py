"""The standalone trainer: style datasets, SD1.x base models, the training loop and its recipes (style LoRA,
DreamBooth, textual inversion). The `stylora train` command line is cli.py's."""
