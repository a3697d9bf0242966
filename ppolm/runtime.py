"""The one place that talks to accelerate: processes, devices, reductions, wrapping for data parallelism.

One process or many (`accelerate launch --config_file configs/accelerate/<file>.yaml` or torchrun; gloo on CPU,
NCCL on GPU). DDP is accelerate's; FSDP2 sharding is done in `ppolm.fsdp` and the DeepSpeed ZeRO engine in
`ppolm.zero` (both requested by the same launcher).
"""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from torch import nn

from ppolm import fsdp, zero
from ppolm.errors import ConfigError
from ppolm.fsdp import fsdp_requested


class Runtime:
    """Thin facade over `accelerate.Accelerator` with the few collective ops PPO needs."""

    def __init__(self, cpu: bool | None = None):
        if not torch.cuda.is_available():
            # gloo on CPU: pin the loopback interface (interface auto-selection is flaky on some hosts)
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            # PPOLM_MALLOC_TUNING=1: reuse freed host memory instead of page-faulting fresh blocks every step
            from ppolm.memory import retain_freed_memory

            retain_freed_memory()
        refuse_fp16(os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))
        if zero.deepspeed_requested():
            zero.check_launch()  # before any model loads
        with _without_env("ACCELERATE_USE_DEEPSPEED"):  # ppolm.zero owns the engine: accelerate only sets up
            # the processes (its DeepSpeed plugin would reject a deepspeed_config_file next to the launcher's keys)
            self.accelerator = Accelerator(cpu=bool(cpu) if cpu is not None else not torch.cuda.is_available())
        refuse_fp16(str(self.accelerator.mixed_precision))
        # FSDP2 sharding is ours (ppolm.fsdp), on CPU and GPU alike; one process has nothing to shard
        self.fsdp = fsdp_requested() and self.world_size > 1
        # DeepSpeed ZeRO is ours too (ppolm.zero): accelerate would not enable it on CPU
        self.deepspeed = zero.deepspeed_requested() and self.world_size > 1
        self.zero3 = self.deepspeed and zero.zero_stage() == 3

    @property
    def params_sharded(self) -> bool:
        """Weights are partitioned across processes (FSDP2, ZeRO-3): every forward is a collective, so every
        process must run as many, and a full copy of a model is a gather."""
        return self.fsdp or self.zero3

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def distributed(self) -> bool:
        return self.accelerator.distributed_type != DistributedType.NO

    def sum(self, value: torch.Tensor | float) -> torch.Tensor:
        """All-reduce sum across processes (identity on one process)."""
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).clone()
        if self.distributed:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def gather_floats(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenate a 1-D tensor from every process in rank order (lengths may differ)."""
        if not self.distributed:
            return values.detach().cpu()
        from accelerate.utils import gather_object

        return torch.tensor(gather_object(values.detach().cpu().tolist()), dtype=values.dtype)

    def gather_object(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every process (pickled; for small states such as RNG)."""
        if not self.distributed:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def from_main(self, obj):
        """The main process's `obj` on every process (a small picklable value; identity on one process)."""
        return self.gather_object(obj)[0] if self.distributed else obj

    def shard(self, model: nn.Module | None) -> nn.Module | None:
        """FSDP2-shard `model` in place when the launch asked for FSDP (before its optimizer is built)."""
        return fsdp.shard(model) if self.fsdp and model is not None else model

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None):
        """(model, optimizer) wrapped for this process layout: DDP through accelerate; a DeepSpeed engine and its
        ZeRO optimizer (clipping at max_grad_norm inside the engine); FSDP2 models are already sharded. One
        process on CPU: a tied input embedding gets a row-sparse gradient (ppolm.memory.row_sparse_tied_embeddings;
        not on CUDA, whose index_add_ adds atomically, in no fixed order, where its embedding backward is
        deterministic; and CUDA's caching allocator reuses the dense gradient's memory anyway)."""
        if self.fsdp:
            return model, optimizer
        if self.deepspeed:
            return zero.initialize(model, optimizer, max_grad_norm)
        if not self.distributed and self.device.type == "cpu":
            from ppolm.memory import row_sparse_tied_embeddings

            row_sparse_tied_embeddings(model)
        return self.accelerator.prepare(model, optimizer)

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor] | None:
        """The full weights of a sharded `module` (FSDP2, ZeRO-3) on the main process, {} on the others (a
        collective: call it on every process); None where every process holds the module whole."""
        if self.fsdp:
            return fsdp.full_state_dict(module)
        if self.zero3:
            return zero.full_state_dict(module, self.is_main)
        return None

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def no_sync(self, model: torch.nn.Module, skip: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if not skip or not self.distributed or self.fsdp or self.deepspeed:  # FSDP2, ZeRO: they reduce themselves
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def broadcast_flag(self, flag: bool) -> bool:
        """True on every process if it is True on any."""
        return bool(self.sum(1.0 if flag else 0.0) > 0)


@contextlib.contextmanager
def _without_env(name: str):
    """`name` unset for the length of the block, restored after."""
    value = os.environ.pop(name, None)
    try:
        yield
    finally:
        if value is not None:
            os.environ[name] = value


def refuse_fp16(mixed_precision: str) -> None:
    """fp16 through accelerate scales the loss: the finiteness check and clipping in `Optimization.step` would
    see scaled gradients and an overflow would count as a failed step, so it is refused (bf16 needs no scaler)."""
    if mixed_precision == "fp16":
        raise ConfigError("accelerate mixed_precision 'fp16' is not supported (loss scaling would defeat the "
                          "gradient checks and clipping); use bf16 (`--mixed_precision bf16` or precision=bf16)")


def local_device() -> torch.device:
    """The device a single-process job (the pipeline's evaluations, `ppolm eval`) runs on: the GPU where one
    is visible, as `Runtime` chooses, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for 'bf16'; for 'auto', bf16 where the hardware runs it natively (AVX512-BF16/AMX CPUs, Ampere+)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except (AttributeError, RuntimeError):
        return None


def reset_peak_rss() -> bool:
    """Restart this process's peak-resident-memory counter, so that `peak_rss_mb` measures from here (Linux:
    writing 5 to /proc/self/clear_refs resets VmHWM). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB since the last `reset_peak_rss` (VmHWM), or since it started
    where /proc is missing (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform == "darwin" else kib / 1024  # bytes on macOS, KiB elsewhere
