"""The config schema (`schema`), named networks and the base recipe (`presets`), start-up
validation (`validation`), and what a run derives and the config of a workdir (`runs`, which
validation imports, never the reverse).

Recipes live in configs/ and import from here: `from ddpm.config import presets, schema`.
"""
