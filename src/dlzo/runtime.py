"""Device, dtype, threads and provenance: what every stage decides the same way.

torch is imported where it is needed, not here: the tables stage records provenance in an
environment without torch (envs/tables.yaml).
"""
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
from typing import TYPE_CHECKING

from dlzo import DLZOError, __version__

if TYPE_CHECKING:
    import torch

# the names --dtype accepts -> torch's dtype attribute
DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16", "fp64": "float64", "float64": "float64"}


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU. An explicit ``cuda`` without a GPU is an error."""
    import torch

    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DLZOError(f"device {requested!r} was asked for but torch sees no CUDA GPU")
    return dev


def pick_dtype(requested: str, device: torch.device, gpu_default: str = "fp16") -> torch.dtype:
    """``auto``: ``gpu_default`` on CUDA, fp32 on CPU (half precision on CPU is slow and inexact)."""
    import torch

    if requested in (None, "", "auto"):
        return getattr(torch, DTYPES[gpu_default]) if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise DLZOError(f"dtype {requested!r} is not one of {sorted(DTYPES)}")
    return getattr(torch, DTYPES[requested])


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def peak_memory_mb(device: torch.device) -> float:
    """GPU: torch's peak allocation; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        import torch

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
    for name in ("torch", "transformers", "peft", "lm_eval", "datasets", "numpy", "pandas", "matplotlib",
                 "snakemake"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def provenance(device: torch.device | None = None, dtype: torch.dtype | None = None,
               started: float | None = None, config: dict | None = None, **extra) -> dict:
    """What made a result file: its config (the stage's arguments), code, packages, machine, device,
    dtype, wall time, and the SLURM job when there is one."""
    torch = sys.modules.get("torch")  # only what the stage itself loaded
    info = {
        "dlzo": __version__,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "argv": sys.argv,
        "config": dict(config) if config is not None else None,
        "threads": torch.get_num_threads() if torch is not None else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device) if device is not None else "cpu",
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
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
