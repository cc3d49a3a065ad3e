"""Errors that modules light enough to load before torch (args, model_path) raise too."""


class ConfigError(ValueError):
    """A startup problem the user can fix (bad flag, missing file, unsupported model)."""
