"""Which device a training process uses, in which precision, and how fast that device is.

A worker serves one device kind (its queue); the process group of a multi-process job is
started by torchrun's elastic agent, which gives each rank its LOCAL_RANK. A job that asked for
the CPU trains on the CPU even on a machine with GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

# Dense peak tensor throughput (FLOP/s) for model FLOPs utilisation, by a part of the device
# name: bf16/fp16 on the tensor cores, and TF32 for float32 matmuls (NVIDIA's data sheets).
PEAK_FLOPS: list[tuple[str, float, float]] = [
    # name, bf16/fp16, tf32
    ("H200", 989e12, 494e12),
    ("H100", 989e12, 494e12),
    ("A100", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("A10", 125e12, 62.5e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12),
]


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def training_device(resources: dict[str, Any] | None = None) -> torch.device:
    """The CUDA device of this rank when there is one and the job did not ask for the CPU;
    otherwise the CPU."""
    wanted = (resources or {}).get("device")
    if wanted == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    rank, count = local_rank(), torch.cuda.device_count()
    if rank >= count:  # two ranks on one GPU would hang NCCL: refuse instead
        raise ValueError(
            f"process {rank + 1} of this job has no GPU of its own: the worker sees {count}; "
            "start the worker with --devices listing one GPU per process"
        )
    return torch.device("cuda", rank)


def describe_device(device: torch.device, world_size: int = 1) -> str:
    """What the job shows as its device: "cpu", "cuda:0 (NVIDIA H200)", "2 × cpu (gloo)"."""
    if device.type == "cuda":
        name = f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    else:
        name = device.type
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        return f"{world_size} × {name} ({backend})"
    return name


@dataclass(frozen=True)
class Precision:
    """How the forward and backward passes run: the autocast dtype (None: float32) and whether
    a gradient scaler guards float16 gradients from underflow. Weights and optimizer state
    stay float32 in every case (AdamW's small updates are rounded away in 16 bits)."""

    name: str  # "fp32" | "bf16" | "fp16"
    autocast_dtype: torch.dtype | None
    scaled: bool


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """ "auto" is bf16 on GPUs that support it, fp16 with a scaler on older GPUs, fp32 on the
    CPU. bf16 and fp16 may be asked for on the CPU (autocast runs them there)."""
    name = requested
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    if name == "fp32":
        return Precision("fp32", None, False)
    if name == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError('this GPU does not support bf16; use precision "fp16" or "auto"')
        return Precision("bf16", torch.bfloat16, False)
    if name == "fp16":
        return Precision("fp16", torch.float16, True)
    raise ValueError(f"unknown precision {requested!r}")


def peak_flops(device: torch.device, precision: Precision) -> float | None:
    """The device's dense peak FLOP/s in this precision, when it is a GPU we know."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for part, half, tf32 in PEAK_FLOPS:
        if part in name:
            return half if precision.autocast_dtype is not None else tf32
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory this process has held: CUDA's max allocated on a GPU, the resident
    set's high-water mark on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
