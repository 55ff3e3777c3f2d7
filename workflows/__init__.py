"""Bundled workflows: the role/title contract, the builder of the JSON files, and the headless client."""
