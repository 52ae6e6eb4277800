"""Atomic file output and small JSON/JSONL helpers.

Every result file is written aside and renamed into place, so a file that exists is complete
(a killed job never leaves a partial file that looks finished).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from dlzo import DLZOError


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean(obj: Any) -> Any:
    """NaN/inf are not JSON: store them as null so every file stays standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        for f in tmp.rglob("*"):
            if not f.is_symlink():
                f.chmod(0o755 if f.is_dir() else 0o644)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_clean(obj), indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.exists():
        raise DLZOError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DLZOError(f"{what} {path} is not valid JSON: {err}") from err


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            for row in rows:
                fh.write(json.dumps(_clean(row), default=_json_default) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise DLZOError(f"data file {path} does not exist")
    rows = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DLZOError(f"{path}, line {lineno}: not valid JSON ({err})") from err
            if not isinstance(row, dict):
                raise DLZOError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _st_dtypes() -> dict:
    """torch dtype -> safetensors' name, in the order its writer lays tensors out (largest first: its Dtype enum,
    descending)."""
    import torch

    return {torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.float32: "F32",
            torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16",
            torch.uint16: "U16", torch.int16: "I16", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
            torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file(tensors, path, metadata)``, byte for byte, one tensor at a time.

    save_file turns every tensor into a bytes object before writing (a second copy of everything it saves:
    the whole model for mezo-full); here each tensor's bytes go from its own memory to the file (a device
    tensor is copied to the host one at a time). The format: an 8-byte little-endian header length, the JSON
    header (``__metadata__``, then per tensor its dtype, shape and [begin, end) byte offsets, tensors ordered
    as safetensors orders them: by dtype, largest first, then by name) padded with spaces to a multiple of 8,
    then the raw little-endian bytes. Metadata keys are written sorted (safetensors' own order is a hash map's,
    random per process: equal bytes need one key). Atomic, as every result file."""
    import struct
    import sys

    import torch

    if sys.byteorder != "little":
        raise DLZOError("write_safetensors writes raw little-endian bytes: use safetensors.torch.save_file here")
    names = _st_dtypes()
    rank = {dtype: i for i, dtype in enumerate(names)}
    items = []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise DLZOError(f"write_safetensors: {name} is not a dense tensor")
        if t.dtype not in names:
            raise DLZOError(f"write_safetensors: no safetensors dtype for {t.dtype}")
        items.append((rank[t.dtype], name, t))
    items.sort(key=lambda x: (x[0], x[1].encode()))
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    offset = 0
    for _, name, t in items:
        size = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(head)))
            fh.write(head)
            for _, _, t in items:
                if t.numel():
                    host = t.detach().to("cpu").contiguous()  # no copy for a contiguous host tensor
                    fh.write(memoryview(host.reshape(-1).view(torch.uint8).numpy()))
                    del host
