"""Test config helpers shared by the training and reliability tests."""


def with_overrides(config: dict, extra: dict) -> dict:
    """Apply ``section__key=value`` (or top-level ``key=value``) keyword overrides to a config dict."""
    for key, value in extra.items():
        section, _, name = key.partition("__")
        if name:
            config.setdefault(section, {})[name] = value
        else:
            config[key] = value
    return config
