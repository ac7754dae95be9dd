"""A second stand-in module for the smollm2 zoo tests (only its text matters)."""


class Namespace:
    """Attributes by keyword."""

    def __init__(self, **kwargs):
        for name, value in kwargs.items():
            setattr(self, name, value)

    def __repr__(self):
        pairs = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()))
        return f"Namespace({pairs})"


def parse_flags(words):
    """Split '--name=value' words into a dict."""
    flags = {}
    for word in words:
        if word.startswith("--") and "=" in word:
            name, value = word[2:].split("=", 1)
            flags[name] = value
    return flags
