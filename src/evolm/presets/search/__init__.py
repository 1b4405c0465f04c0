"""Built-in `evolm search` presets (YAML files in this package)."""
