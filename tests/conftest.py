"""Shared pytest set-up. Fixtures live in their own modules, loaded here as plugins."""
pytest_plugins = ["fixtures_sam2", "fixtures_labelstudio", "fixtures_data"]
