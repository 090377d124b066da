"""
An entry point's set-up: its config, and its process (device, precision, DDP ranks, stop signals).

The config is nanoGPT's configurator, made safe. A script keeps its defaults in one dict and calls

    config = configure(DEFAULTS, sys.argv[1:], doc=__file__)

Arguments are applied in order: `path/to/preset.py` (a plain Python file of assignments, run in a fresh
namespace) and `--key=value` (the value read as a Python literal, or taken as a string; booleans as
--key=True). Unknown keys and values of the wrong type raise ConfigError with one line naming the key, before
any heavy work starts; a key that is gone (`renamed`: config/defaults.py's RENAMED) raises its own line, which
says what to set instead. `--help` or `-h` prints the script's usage (its docstring's first paragraph and the
commands after it) and every key with its default and the comment after it in the DEFAULTS block, then exits.
"""

import ast
import io
import math
import os
import signal
import sys
import tokenize
from ast import literal_eval
from contextlib import nullcontext

import torch
import torch.distributed as dist


class ConfigError(ValueError):
    pass


def _coerce(key, value, default):
    """value, checked against the type of the default (None = any type; an int is a fine float); a float must
    be finite (1e999 reads as inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    if default is None or value is None:
        return value
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not expected:
        raise ConfigError(f"{key} must be {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _set(config, key, value, source, renamed):
    """config[key] = value; an unknown key, or one that is gone (renamed: {key: the line naming what to set
    instead}), is one line."""
    if key not in config:
        raise ConfigError(renamed.get(key) or f"unknown config key {key!r} (from {source}); "
                          f"valid keys: {', '.join(sorted(config))}")
    config[key] = _coerce(key, value, config[key])


def existing_file(path, what, fix=""):
    """path, if it is a file; else FileNotFoundError naming what it is for and the fix (a folder says so)."""
    if not os.path.isfile(path):
        found = "is a folder, not a file" if os.path.isdir(path) else "not found"
        raise FileNotFoundError(f"{what} {path!r} {found}{fix}")
    return path


def _apply_file(config, path, renamed):
    namespace = {"__file__": os.path.abspath(path)}   # a preset may build on another next to it
    try:
        with open(existing_file(path, "config file"), encoding="utf-8-sig") as f:   # a leading BOM is skipped
            source = f.read()
        exec(compile(source, path, "exec"), namespace)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path!r} is not UTF-8 text: save it as UTF-8") from None
    except SyntaxError as e:
        raise ConfigError(f"config file {path!r}, line {e.lineno}: {e.msg}") from None
    for key, value in namespace.items():
        if not key.startswith("_") and not callable(value) and type(value).__name__ != "module":
            _set(config, key, value, path, renamed)


def _parse_value(text):
    try:
        return literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word like --device=cuda is a string


def configure(defaults, argv, doc=None, keys_doc=None, renamed=None):
    """A copy of `defaults` with the presets and --key=value overrides in argv applied in order. With --help
    or -h anywhere in argv: print help_text(defaults, doc, keys_doc) and exit 0. doc: the script's file
    (__file__; None = the running script's); keys_doc: the file of the DEFAULTS dict, if not doc; renamed:
    {a key that is gone: the line to stop with}."""
    doc = doc or getattr(sys.modules["__main__"], "__file__", None)
    if any(arg in ("--help", "-h") for arg in argv):
        try:
            print(help_text(defaults, doc, keys_doc), flush=True)
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
            _set(config, key, value, "the command line", renamed or {})
        else:
            _apply_file(config, arg, renamed or {})
    return config

# -----------------------------------------------------------------------------
# --help: the DEFAULTS block's own comments, so the meanings live in one place


def _describe(source, first_key):
    """From the source of the `dict(key=value, ...)` call holding first_key: ({key: its meaning}, {key: the
    section header right above it}). A key's meaning is the comment on the line where its value ends (the last
    key on that line takes it), joined with the comment-only lines right after it that are indented past the
    key; a comment-only line at the keys' indent heads a section."""
    def is_block(node):
        return isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict" \
            and any(kw.arg == first_key for kw in node.keywords)
    call = next(filter(is_block, ast.walk(ast.parse(source))), None)
    if call is None:
        return {}, {}
    comments, alone = {}, {}        # {line: (column, text)} of every comment, and of the comment-only lines
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
            if tok.line.lstrip().startswith("#"):
                alone[tok.start[0]] = comments[tok.start[0]]
    keys = [kw for kw in call.keywords if kw.arg]
    last_on_line = {kw.end_lineno: kw.arg for kw in keys}
    meaning, section, line = {}, {}, call.lineno
    for kw in keys:
        header = [text for n, (col, text) in sorted(alone.items())
                  if line < n < kw.lineno and col <= kw.col_offset and text]
        if header:
            section[kw.arg] = " ".join(header)
        if last_on_line[kw.end_lineno] == kw.arg and kw.end_lineno in comments:
            parts, n = [comments[kw.end_lineno][1]], kw.end_lineno + 1
            while n in alone and alone[n][0] > kw.col_offset:
                parts.append(alone[n][1])
                n += 1
            meaning[kw.arg] = " ".join(p for p in parts if p)
        line = kw.end_lineno
    return meaning, section


def _usage(docstring):
    """The docstring's first paragraph, and the indented block of commands right after it if there is one."""
    paragraphs = [p for p in (docstring or "").strip("\n").split("\n\n") if p.strip()]
    keep = paragraphs[:1]
    if len(paragraphs) > 1 and all(line.startswith(" ") for line in paragraphs[1].splitlines()):
        keep.append(paragraphs[1])
    return "\n\n".join(keep)


def _shown(value):
    """A default as it is written after --key=: a plain word as it is, anything else as a Python literal."""
    if isinstance(value, str) and value and value.isprintable() and not any(c.isspace() for c in value) \
            and _parse_value(value) == value:   # '' and '2024' are shown quoted
        return value
    return repr(value)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def help_text(defaults, path=None, keys_path=None):
    """Usage (from the script's docstring) and one line per key: --key=default, then its meaning (from the
    comments of the DEFAULTS dict in keys_path, or in the script when None)."""
    meaning, section, doc = {}, {}, ""
    try:
        doc = ast.get_docstring(ast.parse(_read(path))) or ""
        meaning, section = _describe(_read(keys_path or path), next(iter(defaults), None))
    except (OSError, TypeError, SyntaxError, ValueError, tokenize.TokenError):
        pass  # no readable source: the keys and their defaults alone
    name = os.path.relpath(path, os.path.dirname(os.path.abspath(__file__))) if path else "script.py"
    name = os.path.basename(path) if name.startswith("..") else name   # bench/bench.py; outside: its name
    lines = [_usage(doc), ""] if doc else []
    lines += [f"usage: python {name} [PRESET.py ...] [--key=value ...]",
              "  applied in order: PRESET.py is a Python file of assignments (config/*.py); a --key=value "
              "value is",
              "  read as a Python literal, else taken as a string (booleans: --key=True); -h, --help: this "
              "text",
              "", "keys, with their defaults:"]
    args = {key: f"--{key}={_shown(value)}" for key, value in defaults.items()}
    width = min(max(map(len, args.values()), default=0), 36)
    for key, arg in args.items():
        if key in section:
            lines.append(section[key])
        lines.append(f"  {arg:<{width}}  {meaning[key]}".rstrip() if key in meaning else f"  {arg}")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# the process: device, precision, DDP ranks, stop signals


def default_device():
    """The best available device: cuda, then mps, then cpu."""
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def default_dtype(device):
    """The best autocast dtype `device` supports: bfloat16, else float16 on CUDA; float32 on CPU and MPS."""
    if device.split(":")[0] != "cuda":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def autocast(device, dtype):
    """torch.autocast to dtype on device's type; none for float32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype))


def precision(c, device_type):
    """(autocast context, GradScaler) for c's dtype (None = default_dtype): bf16 where supported, fp16 + loss
    scaling otherwise, float32 (no autocast) on CPU and MPS."""
    dtype = c["dtype"] or default_dtype(device_type)
    return autocast(device_type, dtype), torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))


def setup_system(c):
    """Starts DDP under torchrun, for a config with device, threads and gradient_accumulation_steps; returns
    (rank, local_rank, world_size, device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if c["gradient_accumulation_steps"] % world:
        raise ConfigError(f"gradient_accumulation_steps={c['gradient_accumulation_steps']} must be divisible "
                          f"by the number of processes ({world})")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = c["device"] or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available() or \
            device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device!r}, but torch {torch.__version__} sees no such device here: set "
                          f"device=cpu, or leave device unset for the best available")
    per_process = os.cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    threads = c["threads"] or (per_process if world > 1 else 0)
    if device == "cpu" and threads:
        torch.set_num_threads(max(1, threads))   # processes sharing a CPU must not oversubscribe its cores
    if device == "cuda" or device.startswith("cuda:"):
        device = f"cuda:{local_rank}" if world > 1 else device
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, local_rank, world, device


def catch_stop_signals():
    """SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler sends before preemption) no longer kill the
    process: they are recorded in the returned list, for a loop to finish its step, save and exit. The same
    signal again exits at once. (torchrun forwards Ctrl-C to its workers as SIGTERM, hence 'the same'.)"""
    caught = []

    def handler(signum, frame):
        if signum in caught:
            sys.exit(128 + signum)
        caught.append(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return caught
