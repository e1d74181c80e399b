"""Published reference data shipped with the package (see platforms.yaml)."""
