"""The Hydra configs, shipped inside the wheel as ``lightning_mk.conf`` (see pyproject.toml)."""
