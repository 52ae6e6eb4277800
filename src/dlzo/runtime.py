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


GPU_SLOTS_ENV, GPU_LOCK_DIR_ENV = "DLZO_GPU_SLOTS", "DLZO_GPU_LOCK_DIR"
_slot = None  # this process's GPU slot: an open, locked file, released when the process ends


def gpu_slots() -> int:
    """The machine's GPUs, counted without touching CUDA (``nvidia-smi -L``); ``DLZO_GPU_SLOTS`` overrides."""
    if os.environ.get(GPU_SLOTS_ENV):
        return int(os.environ[GPU_SLOTS_ENV])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def claim_gpu_slot(wait_s: float = 24 * 3600) -> str | None:
    """One machine, several GPUs, no scheduler handing them out (``snakemake --cores 16 --resources gpu=4``):
    give this job a GPU of its own before CUDA starts. Slot i is the lock file ``gpu<i>.lock`` in
    ``$DLZO_GPU_LOCK_DIR`` (default /tmp/dlzo-gpu-slots-<uid>), held until the process ends; the job then sees
    only GPU i (``CUDA_VISIBLE_DEVICES=i``). A no-op where CUDA_VISIBLE_DEVICES is already set (SLURM and
    most schedulers set it), under SLURM, or with fewer than two GPUs. Returns the slot, or None."""
    global _slot
    if _slot is not None:
        return os.environ.get("CUDA_VISIBLE_DEVICES")
    if "CUDA_VISIBLE_DEVICES" in os.environ or os.environ.get("SLURM_JOB_ID"):
        return None
    n = gpu_slots()
    if n < 2:
        return None
    import fcntl

    folder = Path(os.environ.get(GPU_LOCK_DIR_ENV) or f"/tmp/dlzo-gpu-slots-{os.getuid()}")
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + wait_s
    while True:
        for i in range(n):
            fh = open(folder / f"gpu{i}.lock", "a")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            _slot = fh
            os.environ["CUDA_VISIBLE_DEVICES"] = str(i)
            return str(i)
        if time.time() > deadline:
            raise DLZOError(f"no free GPU slot of {n} in {folder} after {wait_s:.0f} s: more GPU jobs run at once "
                            f"than the machine has GPUs (give snakemake --resources gpu=<at most {n}>)")
        time.sleep(1.0)


def gpu_given() -> str | None:
    """What says that this job was given a GPU, or None: the scheduler's CUDA_VISIBLE_DEVICES naming one, or
    SLURM's GPU allocation variables (set for a job with --gpus even where its cgroup leaves CUDA_VISIBLE_DEVICES
    unset)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("-1", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    for var in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE"):
        value = os.environ.get(var, "").strip()
        if value and value != "0":
            return f"{var}={value}"
    return None


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU, unless the job was given a GPU that torch cannot use: that
    is an error, never a silent CPU run (a 7B job would crawl on one core until its time limit). An
    explicit ``cuda`` without a usable GPU is an error too."""
    import torch

    if requested in (None, "", "auto", "cuda"):
        claim_gpu_slot()  # before CUDA starts: several GPUs on one machine, one each
    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        given = gpu_given()
        if given:
            raise DLZOError(
                f"this job was given a GPU ({given}) but torch {torch.__version__} cannot use CUDA "
                f"(its CUDA build: {torch.version.cuda or 'none, a CPU-only wheel'}): install torch for the "
                f"node's CUDA line and driver (README, cluster set-up), or run on CPU on purpose with --device cpu "
                f"(config: runtime.device: cpu)")
        return torch.device("cpu")
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
