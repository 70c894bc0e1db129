"""What the command-line tools (infer.py, train.py, convert_weights.py, python -m speechllm.*) share:
argparse types that refuse a meaningless number up front, and the output-path checks, so that a
user's mistake ends in one `error:` line naming the input instead of a traceback."""
import argparse
from pathlib import Path


def at_least(low, kind=int):
    """An argparse type: a `kind` number >= low (`--batch-size 0` is refused by argparse's own usage
    error, naming the option)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not value >= low:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value

    parse.__name__ = f"at_least_{low}"
    return parse


def checked(parse):
    """An argparse type from a parser that raises ValueError: its message becomes argparse's (one
    usage error naming the option) instead of "invalid <function> value"."""
    def wrapped(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    wrapped.__name__ = parse.__name__
    return wrapped


def _file_above(path: Path) -> Path | None:
    """The first existing parent of path that is a file (so nothing can be created under it)."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def output_file(path) -> Path:
    """A file about to be written: its folder may not exist yet, but the path itself must not be a
    directory (ValueError otherwise)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; name the file to write")
    if (above := _file_above(path)) is not None:
        raise ValueError(f"{path}: {above} is a file, not a folder")
    return path


def output_dir(path) -> Path:
    """A folder about to be written into: it may not exist yet, but must not be a file (ValueError)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: is an existing file, not a directory; name a new directory")
    if (above := _file_above(path)) is not None:
        raise ValueError(f"{path}: {above} is a file, not a folder")
    return path
