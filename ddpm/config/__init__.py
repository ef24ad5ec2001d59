"""The config schema (`schema`), named networks and the base recipe (`presets`), start-up
validation (`validation`) and the config of a workdir (`runs`).

Recipes live in configs/ and import from here: `from ddpm.config import presets, schema`.
"""
