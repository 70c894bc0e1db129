"""Training checkpoints, written atomically.

    out_dir/step_N/config.json, model.safetensors, tokenizer.json, ...   the model (adapters merged):
                                                                         infer.py --checkpoint out_dir/step_N
    out_dir/step_N/trainer_state.pt     step, sampler position, optimizer, every rank's RNG states,
                                        loop counters, best metric, unmerged adapter tensors
    out_dir/step_N/config.yaml          the resolved training config
    out_dir/best.json                   {"step", "monitor", "value"} of the best dev result

A checkpoint is built under out_dir/.step_N.tmp, every file and folder is fsynced, and only then
renamed to step_N (a rename is atomic on POSIX file systems). A run killed at any moment leaves
complete step_N folders and at most one temporary folder, which `latest` ignores and
`remove_partial` deletes. Pruning keeps the newest `keep_last` and the best.
"""
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from .model import SpeechLLM
from .weights import fsync_dir, fsync_tree

STEP_DIR = re.compile(r"^step_(\d+)$")
STATE = "trainer_state.pt"


def save(out_dir, step: int, write_model: Callable[[Path], None], state: dict, config_yaml: str) -> Path:
    """Write step_N atomically: write_model(folder) fills in the model files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final, tmp = out_dir / f"step_{step}", out_dir / f".step_{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_model(tmp)
    torch.save(state, tmp / STATE)
    (tmp / "config.yaml").write_text(config_yaml)
    fsync_tree(tmp)
    if final.exists():  # the same step written again (a resumed run redoing it): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(out_dir)
    return final


def steps(out_dir) -> list[int]:
    """Steps of the complete checkpoints in out_dir, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted(s for s, p in found if (p / STATE).is_file())


def latest(out_dir) -> Path | None:
    found = steps(out_dir)
    return Path(out_dir) / f"step_{found[-1]}" if found else None


def remove_partial(out_dir) -> list[str]:
    """Delete the temporary folders of interrupted writes; return their names."""
    out_dir = Path(out_dir)
    gone = [p for p in out_dir.glob(".step_*.tmp")] if out_dir.is_dir() else []
    for p in gone:
        shutil.rmtree(p)
    return [p.name for p in gone]


def prune(out_dir, keep_last: int, best_step: int | None = None) -> None:
    found = steps(out_dir)
    keep = set(found[-keep_last:]) | ({best_step} if best_step is not None else set())
    for s in found:
        if s not in keep:  # renamed first, so that a kill during the deletion leaves no half step_N
            doomed = Path(out_dir) / f".step_{s}.tmp"
            os.rename(Path(out_dir) / f"step_{s}", doomed)
            shutil.rmtree(doomed)


def load_state(path) -> dict:
    """trainer_state.pt, read with weights_only=True: a file that needs arbitrary pickled objects (or
    is damaged) is refused with a ValueError naming it; nothing in it is ever run."""
    file = Path(path) / STATE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: not a training checkpoint ({STATE} is missing)") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(f"{file}: not a weights-only training state (torch.load(weights_only=True) refused it: "
                         f"{first[:200]}); it was not written by train.py") from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated, or not a torch file at all
        raise ValueError(f"{file}: not a readable training state ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(state, dict) or "optimizer" not in state:
        raise ValueError(f"{file}: not a training state written by train.py (no optimizer state)")
    return state


def export(model: SpeechLLM, state: dict, path: Path) -> None:
    """save_pretrained of a plain SpeechLLM holding `state` (lora.merged_state_dict: adapters
    merged), without copying the tensors."""
    with torch.device("meta"):
        plain = SpeechLLM(model.cfg, model.tokenizer, model.encoder_tokenizer)
    plain.load_state_dict(state, strict=True, assign=True)
    if model.cfg.llm.tie_word_embeddings:
        plain.llm.tie_weights()
    plain.save_pretrained(path)


def resume_dir(arg: str | None, out_dir) -> Path | None:
    """--resume: None (refuse an out_dir that holds checkpoints), 'auto' (the newest one, or a
    fresh start when there is none) or a checkpoint folder."""
    out_dir = Path(out_dir)
    if arg is None:
        if steps(out_dir):
            raise ValueError(f"{out_dir} already holds checkpoints: pass --resume auto, or set another trainer.out_dir")
        return None
    if arg == "auto":
        return latest(out_dir)
    path = Path(arg)
    if not (path / STATE).is_file():
        raise ValueError(f"{path}: not a training checkpoint ({STATE} is missing)")
    return path


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
