"""The standalone trainer: datasets, SD1.x base models, style LoRAs and the `stylora` CLI."""
