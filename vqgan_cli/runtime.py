"""Where and how a run executes: device, processes (torchrun/DDP), precision and randomness.

``torchrun --nproc_per_node N vqgan ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; we then join a process
group (gloo on CPU, nccl on CUDA) with no other change to the command.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks this process's GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


MAX_AUTO_WORKERS = 8  # more loader processes than this rarely speed up these decoders


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container or taskset may give
    fewer than the machine has), the count PyTorch checks ``num_workers`` against."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def resolve_workers(workers: int | str) -> int:
    """DataLoader worker processes for ``workers``: an integer as given; ``auto`` leaves one core
    of this process's share (usable cores / processes per node under torchrun) to the main
    process and uses at most MAX_AUTO_WORKERS: 2 cores give 1 worker, 1 core gives 0 (load in
    the main process), never more than PyTorch suggests, so it never warns."""
    if workers != "auto":
        return int(workers)
    share = usable_cores() // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    return max(min(MAX_AUTO_WORKERS, share - 1), 0)


def setup_runtime(device: str = "auto", threads: int | None = None) -> Runtime:
    """Join the torchrun process group when launched by torchrun; pick the device."""
    if threads:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, rank, world, local)


def shutdown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """All RNG states that training consumes, as tensors/plain values (weights_only-loadable)."""
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def any_rank(flag: bool, rt: Runtime) -> bool:
    """True on every rank when it is true on any rank (keeps decisions in lockstep)."""
    if not rt.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def average_gradients(module: torch.nn.Module, rt: Runtime) -> None:
    """Manual gradient averaging for modules not wrapped in DDP (the discriminator, see loop)."""
    if not rt.distributed:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= rt.world_size


def broadcast_buffers(module: torch.nn.Module, rt: Runtime) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank so all ranks stay identical."""
    if not rt.distributed:
        return
    for b in module.buffers():
        dist.broadcast(b, src=0)


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


class RankMismatch(ValueError):
    """Ranks of one torchrun launch disagree (arguments, world size); exit 2, nothing written."""


def my_share(n_items: int, rt: Runtime) -> list[int]:
    """The items rank r handles: r, r + world, r + 2 world, ... A fixed, disjoint split that
    depends only on the item count and the world size, so a resumed run with the same world size
    gives every rank the same items again."""
    return list(range(rt.rank, n_items, rt.world_size))


def check_same_arguments(rt: Runtime, arguments: dict, what: str) -> None:
    """Stop every rank with a clear error when some rank was started with other ``arguments``
    (a JSON-able dict of the command's settings) than rank 0: their outputs would not fit
    together. A no-op in one process."""
    if not rt.distributed:
        return
    digest = hashlib.sha256(json.dumps(arguments, sort_keys=True, default=str).encode()).hexdigest()
    seen: list[str | None] = [None] * rt.world_size
    dist.all_gather_object(seen, digest)
    differ = [r for r, d in enumerate(seen) if d != seen[0]]
    if differ:
        ranks = ", ".join(map(str, differ))
        raise RankMismatch(f"{what}: rank(s) {ranks} were started with other arguments than rank 0; "
                           "start every rank with the same command line")


def gather_rows(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Every rank's rows of ``t`` (n_r, ...) concatenated in rank order, on every rank (ranks may
    hold different numbers of rows). In one process: ``t`` itself."""
    if not rt.distributed:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    counts = [torch.zeros_like(n) for _ in range(rt.world_size)]
    dist.all_gather(counts, n)
    most = int(max(c.item() for c in counts))
    padded = t.new_zeros((most, *t.shape[1:]))
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(rt.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:int(c.item())] for p, c in zip(parts, counts, strict=True)])


@contextlib.contextmanager
def maybe_no_sync(model: torch.nn.Module, skip_sync: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on micro-batches that are not the last of a step."""
    if skip_sync and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


# --- Precision: what the hardware computes natively ----------------------------------------------
# bf16 autocast is 2-2.8x faster than fp32 on CPUs with avx512_bf16 or AMX, but emulated and about
# 10x slower on CPUs without them (AVX2 laptops, many cloud machines). ``auto`` asks the hardware:
# bf16 where native (torch's CPU feature queries; CUDA devices that compute bf16), fp16 with loss
# scaling for training on older GPUs, else fp32. Every command prints the choice and its reason.

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class PrecisionError(ValueError):
    """A precision the device cannot run (fp16 on a CPU) or an unknown name: a usage error."""


@dataclass(frozen=True)
class Precision:
    """The precision a run uses, what was asked for, and why."""

    name: str  # fp32 | bf16 | fp16
    requested: str  # auto | fp32 | bf16 | fp16
    reason: str  # in words, for the console and the run's records
    slow: bool = False  # bf16 asked for on a CPU that emulates it

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"

    def record(self) -> dict[str, str]:
        """What a run folder or sidecar keeps of the choice."""
        return {"precision": self.name, "precision_requested": self.requested, "precision_reason": self.reason}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_features() -> list[str]:
    """The bf16 features of this CPU that make bf16 matrix work native: ``avx512_bf16`` and
    ``amx_bf16`` (torch's queries, which read CPUID), or an Arm ``bf16`` flag; [] when it has none."""
    found = []
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if avx512_bf16 is not None and amx is not None:
        if avx512_bf16():
            found.append("avx512_bf16")
        if amx():
            found.append("amx_bf16")
        return found
    flags = _cpu_flags()  # an older torch without the queries
    return [f for f in ("avx512_bf16", "amx_bf16", "bf16") if f in flags]


def cpu_capability() -> str:
    """torch's ATen kernel level on this CPU: ``AVX512``, ``AVX2``, ``DEFAULT`` ..."""
    return str(torch.backends.cpu.get_cpu_capability())


def bf16_is_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(cpu_bf16_features())
    return False


def _native_reason(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} computes bf16"
    return f"this CPU computes bf16 natively ({', '.join(cpu_bf16_features())})"


def resolve_precision(requested: str, device: torch.device, *, training: bool = True,
                      key: str = "precision") -> Precision:
    """``requested`` (auto, fp32, bf16, fp16) -> what to run on ``device``. ``training``: fp16
    (with loss scaling) is a choice only for training on CUDA; sampling and encoding then use fp32.
    Raises PrecisionError, naming ``key``, for a precision the device cannot run."""
    if requested not in PRECISIONS:
        raise PrecisionError(f"{key}: must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    native = bf16_is_native(device)
    if requested == "auto":
        if native:
            return Precision("bf16", "auto", f"auto: {_native_reason(device)}")
        if device.type == "cuda" and training:
            return Precision("fp16", "auto", f"auto: {torch.cuda.get_device_name(device)} has no bf16; "
                                             "fp16 with loss scaling")
        why = ("this CPU has no avx512_bf16 or AMX, so bf16 would be emulated (about 10x slower)"
               if device.type == "cpu" else f"{device.type} without native bf16")
        return Precision("fp32", "auto", f"auto: {why}")
    if requested == "fp16" and (device.type != "cuda" or not training):
        raise PrecisionError(f"{key}=fp16 needs a CUDA device and is for training; use auto, fp32 or bf16")
    if requested == "bf16" and device.type == "cpu" and not native:
        return Precision("bf16", "bf16", f"asked for; this CPU ({cpu_capability()}) emulates bf16", slow=True)
    return Precision(requested, requested, "asked for")


def slow_bf16_warning(choice: Precision, key: str = "precision") -> str | None:
    """The warning for bf16 on a CPU that emulates it, or None."""
    if not choice.slow:
        return None
    return (f"{key}=bf16 on a CPU without avx512_bf16 or AMX ({cpu_capability()}): bf16 is emulated "
            f"here and runs several times slower than fp32 (about 10x in our measurements); set "
            f"{key}=auto or {key}=fp32 to run at full speed")


def print_precision(choice: Precision, key: str = "precision") -> None:
    """The choice and its reason on the console, and the slow-bf16 warning where it applies."""
    from rich.markup import escape

    from vqgan_cli.console import console

    console.print(f"precision: {escape(choice.describe())}")
    if text := slow_bf16_warning(choice, key):
        console.print(f"[yellow]warning:[/] {escape(text)}")


def announce_precision(requested: str, device: torch.device, *, training: bool = False,
                       key: str = "precision", show: bool = True) -> Precision:
    """:func:`resolve_precision`, printed with :func:`print_precision` when ``show`` (the main
    process). Non-training commands (encode, sample, evaluate, demo) call this."""
    choice = resolve_precision(requested, device, training=training, key=key)
    if show:
        print_precision(choice, key)
    return choice


def autocast_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision; None for fp32."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device: torch.device, name: str) -> contextlib.AbstractContextManager:
    """Autocast for a resolved precision (fp32, bf16, fp16) on ``device``; fp32: a no-op context."""
    dtype = autocast_dtype(name)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
