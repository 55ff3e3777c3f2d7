"""Bottom layer: image loading, atomic files, LoRA files, resource records, settings, plots. Imports nothing else
from the pack."""
