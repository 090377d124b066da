"""
nanoGPT's configurator, made safe. A script keeps its defaults in one dict and calls

    config = configure(DEFAULTS, sys.argv[1:], doc=__file__)

Arguments are applied in order: `path/to/preset.py` (a plain Python file of assignments, run in a fresh
namespace) and `--key=value` (the value read as a Python literal, or taken as a string; booleans as
--key=True). Unknown keys and values of the wrong type raise ConfigError with one line naming the key, before
any heavy work starts. `--help` or `-h` prints the script's usage (its docstring's first paragraph and the
commands after it) and every key with its default and the comment after it in the DEFAULTS block, then exits.
"""

import ast
import io
import os
import sys
import tokenize
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


def configure(defaults, argv, doc=None):
    """A copy of `defaults` with the presets and --key=value overrides in argv applied in order. With --help or
    -h anywhere in argv: print help_text(defaults, doc) and exit 0. doc: the script's file (__file__); None =
    the file of the module that holds `defaults` as a global, else the running script."""
    if any(arg in ("--help", "-h") for arg in argv):
        try:
            print(help_text(defaults, doc or _defining_file(defaults)), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader left; no traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    config = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                hint = f": write --{key}=True" if isinstance(config.get(key), bool) else ""
                raise ConfigError(f"argument {arg!r} must look like --key=value{hint}")
            # a str-valued key takes the text as it is, so --start=123 or --out_dir=2024 stay strings
            value = text if isinstance(config.get(key), str) else _parse_value(text)
            _set(config, key, value, "the command line")
        else:
            _apply_file(config, arg)
    return config


def default_device():
    """The best available device: cuda, then mps, then cpu."""
    import torch
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def default_dtype(device):
    """The best autocast dtype `device` supports: bfloat16, else float16 on CUDA; float32 on CPU and MPS."""
    import torch
    if device.split(":")[0] != "cuda":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"

# -----------------------------------------------------------------------------
# --help: the DEFAULTS block's own comments, so the meanings live in one place


def _defining_file(defaults):
    """The file of the first module up the call stack that holds `defaults` as a global, else the script's."""
    frame = sys._getframe(1)
    while frame is not None:
        if any(value is defaults for value in frame.f_globals.values()):
            return frame.f_globals.get("__file__")
        frame = frame.f_back
    return getattr(sys.modules.get("__main__"), "__file__", None)


def _dict_block(tree, first_key):
    """The module-level `NAME = dict(key=value, ...)` or `NAME = {"key": value, ...}` holding first_key:
    [(key, its first ast node, its last)] in source order, and the block's first line; ([], 0) if none."""
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        v = node.value
        if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "dict" and not v.args:
            items = [(kw.arg, kw, kw) for kw in v.keywords if kw.arg]
        elif isinstance(v, ast.Dict):
            items = [(k.value, k, val) for k, val in zip(v.keys, v.values) if isinstance(k, ast.Constant)]
        else:
            continue
        if any(key == first_key for key, _, _ in items):
            return items, v.lineno
    return [], 0


def _comments(source):
    """({line: (column, text)} of every comment, set of lines holding code)."""
    comments, code = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code.update(range(tok.start[0], tok.end[0] + 1))
    return comments, code


def _describe(source, first_key):
    """From the DEFAULTS block's source: ({key: its meaning}, {key: the section header right above it}). A key's
    meaning is the comment on the line where its value ends (the last key on that line takes it), joined with
    the comment-only lines right after it that are indented past the key; a comment-only line at the keys'
    indent heads a section."""
    items, line = _dict_block(ast.parse(source), first_key)
    comments, code = _comments(source)
    alone = {n: c for n, c in comments.items() if n not in code}        # comment-only lines
    last_on_line = {last.end_lineno: key for key, _, last in items}
    meaning, section = {}, {}
    for key, first, last in items:
        col, end = first.col_offset, last.end_lineno
        header = [text for n, (c, text) in sorted(alone.items()) if line < n < first.lineno and c <= col and text]
        if header:
            section[key] = " ".join(header)
        if last_on_line[end] == key and end in comments:
            parts, n = [comments[end][1]], end + 1
            while n in alone and alone[n][0] > col:
                parts.append(alone[n][1])
                n += 1
            meaning[key] = " ".join(p for p in parts if p)
        line = end
    return meaning, section


def _usage(docstring):
    """The docstring's first paragraph, and the indented block of commands right after it if there is one."""
    paragraphs = [p for p in (docstring or "").strip("\n").split("\n\n") if p.strip()]
    keep = paragraphs[:1]
    if len(paragraphs) > 1 and all(l.startswith(" ") for l in paragraphs[1].splitlines()):
        keep.append(paragraphs[1])
    return "\n\n".join(keep)


def _shown(value):
    """A default as it is written after --key=: a plain word as it is, anything else as a Python literal."""
    if isinstance(value, str) and value and value.isprintable() and not any(c.isspace() for c in value) \
            and _parse_value(value) == value:   # '' and '2024' are shown quoted
        return value
    return repr(value)


def help_text(defaults, path=None):
    """Usage (from the script's docstring) and one line per key: --key=default, then its meaning."""
    meaning, section, doc = {}, {}, ""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        doc = ast.get_docstring(ast.parse(source)) or ""
        meaning, section = _describe(source, next(iter(defaults), None))
    except (OSError, TypeError, SyntaxError, ValueError, tokenize.TokenError):
        pass  # no readable source: the keys and their defaults alone
    name = os.path.basename(path) if path else "script.py"
    lines = [_usage(doc), ""] if doc else []
    lines += [f"usage: python {name} [PRESET.py ...] [--key=value ...]",
              "  applied in order: PRESET.py is a Python file of assignments (config/*.py); a --key=value value is",
              "  read as a Python literal, else taken as a string (booleans: --key=True); -h, --help: this text",
              "", "keys, with their defaults:"]
    args = {key: f"--{key}={_shown(value)}" for key, value in defaults.items()}
    width = min(max(map(len, args.values()), default=0), 36)
    for key, arg in args.items():
        if key in section:
            lines.append(section[key])
        lines.append(f"  {arg:<{width}}  {meaning[key]}".rstrip() if key in meaning else f"  {arg}")
    return "\n".join(lines)
