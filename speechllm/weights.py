"""Model directories on disk: one writer, one reader, one report of what does not fit.

    DIR/config.json          what the model is (its model_type names the class)
    DIR/model.safetensors    the weights; Hugging Face directories may shard them instead, listed in
                             model.safetensors.index.json
    DIR/...                  tokenizer files

Every file is written beside its final name, fsynced and renamed over it. A rename is atomic on
POSIX file systems, so a reader (or a model still memory-mapping the old file) never sees half a
file, and a crash leaves the old file or the new one, never a mix.

`read_state` reads the tensor headers first and checks them against the model before any tensor is
loaded; `check_fit` is the package's one misfit report (convert.remap and load_checkpoint_into use
it too): every tensor missing from the file, every tensor the model does not have and every shape
that differs, in one error. A broken file (config.json that is not JSON or lacks a section, a
truncated or garbled safetensors header) is a ConversionError, a ValueError, naming the file.
`check_output_dir` is the one rule for writing a model directory over something: never over the
files it is being made from, and over another model only when asked.
"""
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                      "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class ConversionError(ValueError):
    """Weights that cannot become the model: an unreadable file, or tensors that do not fit it."""


# ----------------------------------------------------------------------------------------------
# writing


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


@contextmanager
def replacing(path):
    """`with replacing(path) as tmp:` write tmp; on success it is fsynced and renamed to path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_bytes(path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_json(path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


# What a model directory may hold: save_dir, Tokenizer.save_pretrained and the models write these names.
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "tokenizer.model", "encoder_tokenizer.model", "generation_config.json")


def check_output_dir(out, sources=(), force: bool = False) -> None:
    """Refuse (ConversionError) to write a model directory `out` where it would destroy something:
    a path that is a file; one of the `sources` it is made from (out is a source directory, or holds
    a source file under a name it writes), even with force; a directory that already holds a model
    (config.json or model.safetensors), unless force."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out}: is an existing file, not a directory; name a new output directory")
    here = out.resolve()
    for src in map(Path, sources):
        if src.resolve() == here or (src.resolve().parent == here and src.name in MODEL_FILES):
            raise ConversionError(f"{out}: is the input {src}; writing there would destroy it "
                                  "(--force does not change that): name a new output directory")
    held = [name for name in ("config.json", "model.safetensors") if (out / name).exists()]
    if held and not force:
        raise ConversionError(f"{out}: already holds a model ({', '.join(held)}); name a new directory, "
                              "or pass --force to replace it")


def save_dir(path, config: dict, state: dict, files: dict | None = None) -> None:
    """A model directory: model.safetensors (state), `files` (name -> bytes), then config.json, each
    written atomically. A stale shard index is removed: it would take precedence over the file."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with replacing(path / "model.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").unlink(missing_ok=True)
    for name, data in (files or {}).items():
        write_bytes(path / name, data)
    write_json(path / "config.json", config)


# ----------------------------------------------------------------------------------------------
# reading


def require(path: Path, names, what: str) -> None:
    """FileNotFoundError unless every file in `names` is in the directory `path`."""
    for name in names:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: not {what} ({name} is missing)")


def read_json(path) -> dict:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def yaml_problem(e: Exception) -> str:
    """A PyYAML error (several lines, with a caret) as one line: what is wrong, and where."""
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def read_config(path, from_dict):
    """from_dict(the JSON object in `path`), with a broken config.json named: a missing section or
    key (KeyError) and a value of the wrong kind (TypeError, ValueError) become a ConversionError
    naming the file."""
    d = read_json(path)
    try:
        return from_dict(d)
    except KeyError as e:
        raise ConversionError(f"{path}: missing {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{path}: {e}") from None


@contextmanager
def open_safetensors(file, device="cpu"):
    """safe_open, with a broken file (truncated, garbled header) reported as a ConversionError naming it."""
    try:
        with safe_open(file, framework="pt", device=str(torch.device(device))) as f:
            yield f
    except SafetensorError as e:
        raise ConversionError(f"{file}: not a readable safetensors file ({e})") from None


def headers(file) -> dict[str, tuple[tuple, str]]:
    """name -> (shape, dtype name) of every tensor in a safetensors file, read without loading any."""
    out = {}
    with open_safetensors(file) as f:
        for name in f.keys():
            sl = f.get_slice(name)
            out[name] = (tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
    return out


def weight_files(path: Path) -> dict[Path, list[str]]:
    """safetensors file -> tensor names it holds, from the index of a sharded checkpoint or the
    single model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = {}
        for name, file in read_json(index)["weight_map"].items():
            files.setdefault(path / file, []).append(name)
        absent = sorted(str(f.name) for f in files if not f.is_file())
        if absent:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {absent}")
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        present = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                f"(only safetensors weights are read); found {present}")
    return {single: list(headers(single))}


def read_state(path, expected: dict, dtype: torch.dtype | None = None, device="cpu", ignore=(),
               what: str | None = None) -> dict:
    """The weights of a model directory for a model whose state_dict() is `expected` (name -> tensor
    or shape; a meta model's will do). Shapes are checked from the headers first (check_fit); then
    only the expected tensors are read, memory-mapped, one at a time, converted to `dtype` if given.
    ignore: name suffixes tolerated in the file although the model has no such tensor; what: how a
    misfit report names the checkpoint (default: its path)."""
    path = Path(path)
    files = weight_files(path)
    found = {}
    for file, names in files.items():
        shapes = headers(file)
        found.update({n: shapes[n][0] for n in names if n in shapes})
    found = {n: s for n, s in found.items() if n in expected or not n.endswith(tuple(ignore))}
    check_fit(found, expected, what or str(path))
    state = {}
    for file, names in files.items():
        with open_safetensors(file, device) as f:
            for name in names:
                if name in expected:
                    t = f.get_tensor(name)
                    state[name] = t.to(dtype) if dtype is not None else t
    return state


def nonfinite(tensors: dict) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (a diverged or damaged
    checkpoint), in order."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_fit(found: dict, expected: dict, what: str, unplaced=(), strict: bool = True) -> None:
    """Raise one ConversionError listing every tensor that does not fit. found / expected: name ->
    tensor or shape (ours after any renaming); unplaced: source names that no key table maps.
    strict=False lets unplaced and unexpected tensors pass (the caller reports them)."""
    shape = lambda x: tuple(x.shape) if hasattr(x, "shape") else tuple(x)
    unexpected = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    mismatched = [f"{k}: checkpoint {shape(found[k])} vs model {shape(expected[k])}"
                  for k in sorted(set(found) & set(expected)) if shape(found[k]) != shape(expected[k])]
    problems = [f"{len(names)} {label}: {short(names)}" for label, names in (
        ("tensors nothing maps", list(unplaced) if strict else []),
        ("tensors the model does not have", unexpected if strict else []),
        ("model tensors missing from the checkpoint", missing),
        ("shape mismatches", mismatched)) if names]
    if problems:
        raise ConversionError(f"{what}: the weights do not fit the model:\n  " + "\n  ".join(problems))


def short(names, n=20) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")
