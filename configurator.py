"""
nanoGPT's configurator, made safe. A script keeps its defaults in one dict and calls

    config = configure(defaults, sys.argv[1:])

Arguments are applied in order: `path/to/preset.py` (a plain Python file of assignments, run in a fresh
namespace) and `--key=value` (the value read as a Python literal, or taken as a string). Unknown keys and
values of the wrong type raise ConfigError with one line naming the key, before any heavy work starts.
"""

import os
from ast import literal_eval


class ConfigError(ValueError):
    pass


def _coerce(key, value, default):
    """value, checked against the type of the default (None = any type; an int is a fine float)."""
    if default is None or value is None:
        return value
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not expected:
        raise ConfigError(f"{key} must be {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _set(config, key, value, source):
    if key not in config:
        raise ConfigError(f"unknown config key {key!r} (from {source}); valid keys: {', '.join(sorted(config))}")
    config[key] = _coerce(key, value, config[key])


def _apply_file(config, path):
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    namespace = {}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), namespace)
    for key, value in namespace.items():
        if not key.startswith("_") and not callable(value) and type(value).__name__ != "module":
            _set(config, key, value, path)


def _parse_value(text):
    try:
        return literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word like --device=cuda is a string


def configure(defaults, argv):
    """A copy of `defaults` with the presets and --key=value overrides in argv applied in order."""
    config = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"argument {arg!r} must look like --key=value")
            # a str-valued key takes the text as it is, so --start=123 or --out_dir=2024 stay strings
            value = text if isinstance(config.get(key), str) else _parse_value(text)
            _set(config, key, value, "the command line")
        else:
            _apply_file(config, arg)
    return config
