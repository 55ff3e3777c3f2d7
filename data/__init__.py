"""Data preparation: WikiArt style folders, COCO content sets, dataset statistics."""
