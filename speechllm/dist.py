"""torch.distributed from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT):
nccl on CUDA, gloo on CPU. Without those variables (a plain `python train.py`) there is one process
and no process group; every helper here then does the single-process thing."""
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def check_device(device: str, what: str = "--device") -> torch.device:
    """The torch.device named by `device` ("auto": cuda:LOCAL_RANK where CUDA is available, else the
    CPU; a bare "cuda" is this process's GPU under torchrun), or a ValueError naming the setting
    (`what`) when this machine has no such device: checked before any model or process group exists."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what} {device}: not a device name (cpu, cuda, cuda:N, mps, ...)") from None
    if dev.type == "cpu":
        return dev
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    if backend is None or not backend.is_available():
        cpu = f"{what} cpu" if what.startswith("--") else f"{what}=cpu"
        raise ValueError(f"{what} {device}: this machine has no {dev.type} device "
                         f"(torch {torch.__version__}); use {cpu}")
    if dev.type != "cuda":
        return dev
    index = local_rank if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"{what} {device}: cuda:{index} does not exist, this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def init(device: str | torch.device = "auto") -> Dist:
    """Read torchrun's variables, pick the device (check_device) and start the process group when
    there is more than one process."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dev = device if isinstance(device, torch.device) else check_device(device, "trainer.device")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, local_rank, world_size, dev)


def launch(nproc: int, script: str, argv: list[str]) -> int:
    """`torchrun --standalone --nproc_per_node nproc script argv` in this process, returning the
    workers' status: 0, the first failed rank's exit code, or 128 + N for a rank killed by signal N.
    torchrun itself ends a failed run with a ChildFailedError traceback and a page of per-rank
    summary; the workers have already said what went wrong (an `error:` line, or their own
    traceback), so here that summary and the launcher's log lines are left out."""
    import logging
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args(["--standalone", f"--nproc_per_node={nproc}", script, *argv]))
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code
    return 0


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_together(code: int, d: Dist | None) -> int:
    """The worst exit status of all ranks, on every rank (call it at the same point on each): a
    rank that failed takes the others down with its status instead of leaving them waiting."""
    if d is None or not dist.is_initialized():
        return code
    box = torch.tensor([code], device=d.device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item())


def report_first_error(code: int, message: str | None, d: Dist) -> int:
    """Each rank's status (and its error line, or None where it printed its own): the lowest
    failing rank prints its line to stderr, exactly once however many ranks failed, and every rank
    gets the worst status. Call it at the same point on each rank."""
    if not dist.is_initialized():
        if code and message:
            print(message, file=sys.stderr, flush=True)
        return code
    first = torch.tensor([d.rank if code else d.world_size], device=d.device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    if code and message and d.rank == int(first.item()):
        print(message, file=sys.stderr, flush=True)
    return exit_together(code, d)  # the line is out before any rank can leave


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def gather_to_master(obj, d: Dist) -> list | None:
    """Every rank's obj, in rank order, on rank 0 (None elsewhere); [obj] with one process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * d.world_size if d.is_master else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(obj, d: Dist):
    """Rank 0's obj on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj if d.is_master else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
