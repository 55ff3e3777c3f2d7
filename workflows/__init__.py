"""Bundled workflows: the role/title contract, the graph model and the definitions, and the headless client."""
