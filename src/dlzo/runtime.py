"""Device, dtype, threads and provenance: what every stage decides the same way."""
from __future__ import annotations

import os
import platform
import resource
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from dlzo import DLZOError, __version__

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp64": torch.float64, "float64": torch.float64}


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU. An explicit ``cuda`` without a GPU is an error."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DLZOError(f"device {requested!r} was asked for but torch sees no CUDA GPU")
    return dev


def pick_dtype(requested: str, device: torch.device, gpu_default: str = "fp16") -> torch.dtype:
    """``auto``: ``gpu_default`` on CUDA, fp32 on CPU (half precision on CPU is slow and inexact)."""
    if requested in (None, "", "auto"):
        return DTYPES[gpu_default] if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise DLZOError(f"dtype {requested!r} is not one of {sorted(DTYPES)}")
    return DTYPES[requested]


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


def peak_memory_mb(device: torch.device) -> float:
    """GPU: torch's peak allocation; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "peft", "lm_eval", "datasets", "snakemake"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def provenance(device: torch.device | None = None, dtype: torch.dtype | None = None,
               started: float | None = None, **extra) -> dict:
    """What made a result file: code, packages, machine, device, dtype, wall time."""
    info = {
        "dlzo": __version__,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "argv": sys.argv,
        "threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device is not None:
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
    if dtype is not None:
        info["dtype"] = str(dtype).replace("torch.", "")
    if started is not None:
        info["wall_s"] = round(time.time() - started, 3)
    info.update(extra)
    return info


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def add_runtime_args(ap) -> None:
    """--device, --dtype and --threads, the same for every stage."""
    ap.add_argument("--device", default="auto", help="auto: CUDA when present, else CPU")
    ap.add_argument("--dtype", default="auto", help="auto: fp16 on GPU, fp32 on CPU; or fp32, fp16, bf16")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")


def setup_runtime(args) -> tuple[torch.device, torch.dtype]:
    set_threads(args.threads)
    device = pick_device(args.device)
    return device, pick_dtype(args.dtype, device)
