"""ZO-SGD (MeZO's SPSA step) as a torch.optim optimizer, with replayable trajectories.

What is tuned is decided only by the parameters passed in: the whole model (MeZO), one decoder
layer (dominant-layer ZO), or peft LoRA adapters. One step (../shared/SPEC.md):

    theta += eps*z;  l+ = L(theta)          z ~ N(0, I), drawn from the step's seed
    theta -= 2eps*z; l- = L(theta)
    theta += eps*z                          (restore)
    g = (l+ - l-) / 2eps
    theta -= lr * (g*z + wd*theta)          (wd skipped for biases and norm weights)

Two ways to restore theta between the perturbations:
  ``restore="mezo"``  MeZO's trainer, op for op: z regenerated from the seed at each of the four uses,
                       ``p.data = p.data + scaling_factor * z * eps`` out of place, the update
                       ``p.data = p.data - lr * (g * z + wd * p.data)`` (wd term skipped for no-decay
                       tensors); theta comes back only up to float rounding. The baseline to compare with.
  ``restore="exact"`` z drawn once per step and kept, theta copied before the perturbation and copied
                       back: two extra copies of the tuned tensors (cheap for one layer or LoRA),
                       and theta comes back bit for bit.
  ``restore="fused"`` in place like MeZO, but the restore and the update share one draw of z
                       (theta += (eps - lr*g) * z): three draws a step instead of four, no extra memory.
Both draw the same z from the same seed, so they follow the same trajectory up to rounding.

Sparse-MeZO (Liu et al. 2024) is a parameter selection, not another optimizer: a param group may carry
``masks`` (one per parameter, ``magnitude_mask``: a ``BitMask``, one bit an element, or a bool tensor), and z
is multiplied by the mask right after it is drawn, so the same z stream perturbs and updates only the
selected weights (the weight decay term too); every other weight keeps its bits.

A run is fully described by the base model and its list of (seed, g, lr) per step: ``replay``
rebuilds the tuned weights bit-identically on the same device type.

Public API besides ``step``/``replay``, for code that measures what ZO-SGD sees without training (the
sensitivity profile in ``dlzo.profiles``):
  ``tensors()``                    the tuned tensors, in the order z is drawn
  ``draw(step)``                   the z of every tuned tensor at ``step`` (step_seed(seed, step), masked)
  ``projected_gradient(closure, step=None)`` -> (l+, l-, g): the two perturbed evaluations of ``step``
                                   (default: the next one) with the optimizer's restore, no update, nothing
                                   recorded; theta is left as it came (``restore="exact"``: bit for bit, also
                                   when the closure raises; otherwise up to rounding).
"""
from __future__ import annotations

import math
from time import perf_counter as _now
from typing import Callable, Iterable

import numpy as np
import torch

NO_DECAY_MARKERS = ("bias", "norm", "layernorm", "layer_norm", "ln_")
CHUNK = 1 << 20  # restore="mezo": elements per chunk of the in-place arithmetic (a multiple of 16)


def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    """[begin, end) spans of ``chunk`` elements over ``n``; a remainder under 16 is folded into the last
    span (torch's CPU normal sampler draws blocks of 16: see ZOSGD._mezo_pass)."""
    if chunk % 16:
        raise ValueError(f"chunk must be a multiple of 16, got {chunk}")
    spans, b = [], 0
    while b < n:
        e = min(n, b + chunk)
        if n - e < 16:
            e = n
        spans.append((b, e))
        b = e
    return spans


def step_seed(run_seed: int, step: int) -> int:
    """The z seed of ``step``: a pure function of (run seed, step), so a resumed run draws the same z."""
    return int(np.random.SeedSequence([int(run_seed), int(step)]).generate_state(1, dtype=np.uint64)[0] >> 1)


_UNPACK: dict = {}


def _unpack_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8): row v holds the bits of byte v, lowest first, as 0 and 1 in ``dtype``."""
    key = (device, dtype)
    if key not in _UNPACK:
        v = torch.arange(256, device=device).unsqueeze(-1)
        _UNPACK[key] = v.bitwise_right_shift(torch.arange(8, device=device)).bitwise_and_(1).to(dtype)
    return _UNPACK[key]


class BitMask:
    """A bool mask of a tensor's shape kept one bit an element (``bits``: uint8, element i of the flattened
    tensor is bit i % 8 of byte i // 8). Sparse-MeZO's masks as bool tensors cost a byte a parameter, a quarter
    of fp32 weights, which alone would lift full-model ZO 14% above inference memory; packed they cost 1/32.
    ``chunk(b, e)`` unpacks a span (b a multiple of 8), ``tensor()`` the whole mask, ``count()`` its Trues."""

    def __init__(self, bits: torch.Tensor, shape):
        self.shape = torch.Size(shape)
        if bits.dtype != torch.uint8 or bits.numel() != (self.shape.numel() + 7) // 8:
            raise ValueError(f"BitMask of shape {tuple(self.shape)} needs {(self.shape.numel() + 7) // 8} uint8 "
                             f"bytes, got {bits.numel()} {bits.dtype}")
        self.bits = bits

    @property
    def device(self) -> torch.device:
        return self.bits.device

    def numel(self) -> int:
        return self.shape.numel()

    @classmethod
    def empty(cls, shape, device) -> "BitMask":
        shape = torch.Size(shape)
        return cls(torch.empty((shape.numel() + 7) // 8, dtype=torch.uint8, device=device), shape)

    @classmethod
    def pack(cls, mask: torch.Tensor, chunk: int = CHUNK) -> "BitMask":
        """The BitMask of a bool tensor, packed chunk by chunk."""
        flat = mask.reshape(-1)
        return cls.empty(mask.shape, mask.device).fill_(lambda b, e, out: out.copy_(flat[b:e]), chunk)

    @torch.no_grad()
    def fill_(self, span, chunk: int = CHUNK) -> "BitMask":
        """Pack the mask span by span: ``span(b, e, out)`` writes the bool mask of flattened elements [b, e) into
        ``out`` (e - b elements of one buffer reused across the spans: no temporaries between the bits)."""
        spans = _chunks(self.numel(), chunk)
        size = max((e - b for b, e in spans), default=0)
        buf = torch.empty(size + (-size) % 8, dtype=torch.bool, device=self.device)
        shifts = torch.arange(8, dtype=torch.uint8, device=self.device)
        for b, e in spans:
            n = e - b
            m = buf[:n + (-n) % 8]
            m[n:] = False  # the last span's padding to whole bytes
            span(b, e, m[:n])
            u = m.view(torch.uint8).view(-1, 8)  # 0/1 bytes, shifted in place to their bit
            torch.sum(u.bitwise_left_shift_(shifts), dim=1, dtype=torch.uint8, out=self.bits[b // 8:(e + 7) // 8])
        return self

    def chunk(self, b: int, e: int, dtype: torch.dtype = torch.bool, out: torch.Tensor | None = None,
              index: torch.Tensor | None = None) -> torch.Tensor:
        """The mask of flattened elements [b, e) (b a multiple of 8) as a ``dtype`` tensor of 0 and 1: a bool
        mask, or the mask in the dtype of what it multiplies (``x * mask`` is then the same bits as with the
        bool mask, and a same-dtype multiply is several times faster on CPU). Unpacked by a 256-row lookup
        table into ``out`` (a flat ``dtype`` buffer, uint8 for bool, of at least e - b rounded up to whole
        bytes) with ``index`` (int64, the bytes) when given: buffers reused from chunk to chunk."""
        if b % 8:
            raise ValueError(f"BitMask.chunk starts on a byte: got {b}")
        byte = self.bits[b // 8:(e + 7) // 8]
        nb = byte.numel()
        kind = torch.uint8 if dtype == torch.bool else dtype
        idx = byte.long() if index is None else index[:nb].copy_(byte)
        got = torch.index_select(_unpack_table(byte.device, kind), 0, idx,
                                 out=None if out is None else out[:nb * 8].view(nb, 8))
        got = got.view(-1)[:e - b]
        return got.view(torch.bool) if dtype == torch.bool else got  # 0/1 bytes are valid bools: a view

    def tensor(self) -> torch.Tensor:
        """The whole mask, as a bool tensor of the tensor's shape."""
        return self.chunk(0, self.numel()).view(self.shape)

    def _spans(self, chunk: int, dtype: torch.dtype = torch.bool):
        """(b, e, the mask of [b, e) as ``dtype``) chunk by chunk, unpacked into one reused buffer."""
        spans = _chunks(self.numel(), chunk)
        size = max((e - b + 7) // 8 * 8 for b, e in spans)
        buf = torch.empty(size, dtype=torch.uint8 if dtype == torch.bool else dtype, device=self.device)
        index = torch.empty(size // 8, dtype=torch.int64, device=self.device)
        for b, e in spans:
            yield b, e, self.chunk(b, e, dtype, buf, index)

    def mul_into(self, t: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
        """``t.mul_(mask)`` for a contiguous ``t`` of the mask's shape, unpacking one chunk at a time."""
        flat = t.view(-1)
        for b, e, m in self._spans(chunk, t.dtype):
            flat[b:e].mul_(m)
        return t

    def count(self, chunk: int = CHUNK) -> int:
        """How many elements the mask selects."""
        return sum(int(m.sum()) for _, _, m in self._spans(chunk))


@torch.no_grad()
def magnitude_mask(p: torch.Tensor, sparsity: float, packed: bool = False,
                   out: BitMask | None = None) -> torch.Tensor | BitMask:
    """Sparse-MeZO's selection in one tensor: True where |w| <= h, h the (1 - sparsity)-quantile of |w|.

    ``sparsity`` is the fraction of the tensor left frozen: 0.75 tunes the 25% smallest-magnitude
    weights (ties at h are all tuned). A pure function of the weights, so replay rebuilds it. A bool tensor,
    or with ``packed`` a ``BitMask`` (one bit an element; written into ``out`` when given), built chunk by
    chunk either way.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    k = max(1, math.ceil((1.0 - sparsity) * p.numel()))
    w = p.detach()
    h = _kth_magnitude(w, k)  # a value of the tensor itself, so exact in its dtype
    if packed and out is None:
        out = BitMask.empty(w.shape, w.device)
    elif packed and (out.shape != w.shape or out.device != w.device):
        raise ValueError(f"BitMask of shape {tuple(out.shape)} on {out.device} for a tensor of shape "
                         f"{tuple(w.shape)} on {w.device}")
    if not w.is_contiguous():
        mask = (w <= h) & (w >= -h)
        if not packed:
            return mask
        flat = mask.reshape(-1)
        return out.fill_(lambda b, e, m: m.copy_(flat[b:e]))
    # chunk by chunk into the mask itself: (w <= h) & (w >= -h) whole would hold three tensor-sized temporaries
    flat = w.view(-1)
    if not packed:
        mask = torch.empty(w.shape, dtype=torch.bool, device=w.device)
        into = mask.view(-1)
        for b, e in _chunks(flat.numel(), CHUNK):
            torch.le(flat[b:e], h, out=into[b:e]).logical_and_(flat[b:e] >= -h)
        return mask
    ge = torch.empty(min(flat.numel(), CHUNK + 15), dtype=torch.bool, device=w.device)

    def span(b, e, m):  # into the reused span buffers
        torch.le(flat[b:e], h, out=m).logical_and_(torch.ge(flat[b:e], -h, out=ge[:e - b]))
    return out.fill_(span)


def _kth_magnitude(w: torch.Tensor, k: int, chunk: int = CHUNK) -> float:
    """The k-th smallest |w| (1-based), exactly, chunk by chunk: no copy of the tensor (torch.kthvalue would add
    a sorted copy and int64 indices, torch.quantile refuses tensors over 16M elements, a float32 copy to
    partition costs the largest tensor again). |w| in float32 (exact for every float dtype up to 32 bits) is
    ordered as its bit pattern: a histogram of the high 16 bits finds the bucket, one of the low 16 bits the
    value; the same value as partitioning the magnitudes."""
    flat = w.reshape(-1)
    spans = _chunks(flat.numel(), chunk)

    def bits(b, e):
        return flat[b:e].to(torch.float32).abs().view(torch.int32)  # abs, not abs_: fp32 .to() is the weights

    hist = torch.zeros(1 << 16, dtype=torch.int64, device=w.device)
    for b, e in spans:
        hist += torch.bincount(bits(b, e).bitwise_right_shift(16), minlength=1 << 16)
    cum = hist.cumsum(0)
    hi = int(torch.searchsorted(cum, torch.tensor([k], device=w.device))[0])
    below = int(cum[hi - 1]) if hi else 0
    hist.zero_()
    for b, e in spans:
        x = bits(b, e)
        hist += torch.bincount(x[x.bitwise_right_shift(16) == hi].bitwise_and(0xFFFF), minlength=1 << 16)
    lo = int(torch.searchsorted(hist.cumsum(0), torch.tensor([k - below], device=w.device))[0])
    return float(torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32)[0])


def _masked(t: torch.Tensor, mask) -> torch.Tensor:
    """``t.mul_(mask)`` for a bool tensor or a BitMask (unpacked a chunk at a time; t contiguous, as drawn). On a
    GPU the chunks are 16x larger: three kernels a chunk, and a 7B model holds 6.7k chunks of 1 M elements."""
    if isinstance(mask, BitMask) and t.is_contiguous():
        return mask.mul_into(t, CHUNK if t.device.type == "cpu" else CHUNK << 4)
    return t.mul_(mask.tensor() if isinstance(mask, BitMask) else mask)


def _mask_span(mask, b: int, e: int, buf: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Flattened elements [b, e) of a bool mask, or of a BitMask unpacked into ``buf`` in its dtype (the dtype of
    what it multiplies: the same product as the bool mask's)."""
    return mask.chunk(b, e, buf.dtype, buf, index) if isinstance(mask, BitMask) else mask.reshape(-1)[b:e]


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float,
                 sparsity: float | None = None) -> list[dict]:
    """Split into a decayed group and a no-decay group (biases, norm weights), order kept within each.

    MeZO goes by name ("bias", "layer_norm"); names differ across families, so 1-D tensors (every bias
    and norm weight) count as no-decay too. With ``sparsity`` (Sparse-MeZO), each group also carries
    ``masks``: the magnitude mask of every tensor (a ``BitMask``), computed now, from the weights as they are.
    """
    decay, no_decay = [], []
    for name, p in named_params:
        skip = p.ndim < 2 or any(m in name.lower() for m in NO_DECAY_MARKERS)
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "decay": True}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "decay": False})
    groups = [g for g in groups if g["params"]]
    if sparsity is not None:
        masks = iter(magnitude_masks([p for g in groups for p in g["params"]], sparsity))
        for g in groups:
            g["masks"] = [next(masks) for _ in g["params"]]
    return groups


@torch.no_grad()
def magnitude_masks(params: list[torch.Tensor], sparsity: float) -> list[BitMask]:
    """``magnitude_mask(p, sparsity, packed=True)`` of every tensor, their bits in one buffer per device,
    allocated before any mask is computed: allocated one by one between the computations' temporaries, the
    small long-lived bit arrays fragment the CPU heap (SmolLM2-135M's masks left 110-175 MB resident there)."""
    sizes = [(p.numel() + 7) // 8 for p in params]
    buffers = {dev: torch.empty(sum(n for n, p in zip(sizes, params) if p.device == dev), dtype=torch.uint8,
                                device=dev) for dev in dict.fromkeys(p.device for p in params)}
    taken = dict.fromkeys(buffers, 0)
    masks = []
    for n, p in zip(sizes, params):
        bits = buffers[p.device][taken[p.device]:taken[p.device] + n]
        taken[p.device] += n
        masks.append(magnitude_mask(p, sparsity, packed=True, out=BitMask(bits, p.shape)))
    return masks


class NonFiniteLoss(FloatingPointError):
    def __init__(self, step: int, l_plus: float, l_minus: float):
        super().__init__(f"non-finite loss at step {step}: L(+)={l_plus}, L(-)={l_minus}")
        self.step = step


class ZOSGD(torch.optim.Optimizer):
    """``ZOSGD(params, lr, eps, weight_decay=0.0, seed=0)``; ``step(closure)`` returns the projected gradient.

    ``closure()`` evaluates the loss at the current parameters (no autograd needed) and returns a
    float or a 0-d tensor. Every step is appended to ``self.trajectory`` as a dict
    {step, seed, g, lr, loss_plus, loss_minus}.
    """

    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                 restore: str = "mezo"):
        if lr < 0 or eps <= 0:
            raise ValueError(f"ZOSGD needs lr >= 0 and eps > 0, got lr={lr}, eps={eps}")
        if restore not in ("mezo", "exact", "fused"):
            raise ValueError(f"restore must be 'mezo', 'exact' or 'fused', got {restore!r}")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))
        self.seed = seed
        self.restore = restore
        self.chunk = CHUNK
        self._buffers: dict = {}  # restore="mezo": the chunk buffers, reused from step to step
        self.steps_done = 0
        self.trajectory: list[dict] = []
        self.timing = {"forward_s": 0.0, "perturb_s": 0.0, "update_s": 0.0}

    def _params(self):
        """(group, parameter, its mask or None), in the order z is drawn."""
        for group in self.param_groups:
            masks = group.get("masks") or [None] * len(group["params"])
            if len(masks) != len(group["params"]):
                raise ValueError(f"param group has {len(group['params'])} params but {len(masks)} masks")
            yield from ((group, p, m) for p, m in zip(group["params"], masks))

    def _seeded(self, seed: int):
        """Every tuned tensor (group, p, mask) with its device's generator, seeded with ``seed`` once per device."""
        gens: dict[torch.device, torch.Generator] = {}
        for group, p, mask in self._params():
            if p.device not in gens:
                gens[p.device] = torch.Generator(device=p.device)
                gens[p.device].manual_seed(seed)
            yield group, p, mask, gens[p.device]

    def _draw(self, seed: int):
        """z for every tuned tensor, in a fixed order, from one generator per device (masked where asked)."""
        for group, p, mask, gen in self._seeded(seed):
            z = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
            if mask is not None:
                _masked(z, mask)  # the full draw first: the generator advances as without a mask
            yield group, p, z, mask

    def tensors(self) -> list[torch.Tensor]:
        """The tuned tensors, in the order z is drawn."""
        return [p for _, p, _ in self._params()]

    @torch.no_grad()
    def draw(self, step: int) -> list[torch.Tensor]:
        """z of every tuned tensor (``tensors()`` order) at ``step``: what ``step`` perturbs with then."""
        return [z for _, _, z, _ in self._draw(step_seed(self.seed, step))]

    @torch.no_grad()
    def projected_gradient(self, closure: Callable[[], float | torch.Tensor] | None = None, step: int | None = None,
                           pair_closure: Callable | None = None) -> tuple[float, float, float]:
        """(L+, L-, g) of ``step`` (default: the next step, ``steps_done``) without taking it: the same
        perturbed evaluations ``step()`` makes (``closure`` or ``pair_closure`` as there), theta restored
        after them, no update, no trajectory entry, ``steps_done`` unchanged. A non-finite loss is returned
        as it is (the caller decides). ``restore="exact"`` gives theta back bit for bit, also on an error."""
        seed = step_seed(self.seed, self.steps_done if step is None else int(step))
        eps = self.param_groups[0]["eps"]
        l_plus, l_minus, _ = self._paired(self._pair(closure, pair_closure), seed, eps)
        if self.restore == "fused":  # _paired leaves theta at theta - eps*z for the fused update: restore it
            self._perturb(seed, 1, eps)
        return l_plus, l_minus, (l_plus - l_minus) / (2 * eps)

    @torch.no_grad()
    def _perturb(self, seed: int, factor: float, eps: float) -> None:
        """theta += factor * eps * z (MeZO's scaling_factor in {1, -2, 1})."""
        if self.restore == "mezo":  # MeZO's expression and evaluation order, in place and by chunks
            def shift(group, p, z, mask, scratch):  # p.data = p.data + factor * z * eps
                p.add_(z.mul_(factor).mul_(eps))
            self._mezo_pass(seed, shift)
            return
        for _, p, z, _ in self._draw(seed):
            p.add_(z, alpha=factor * eps)

    @staticmethod
    def _decay(p: torch.Tensor, wd: float, mask) -> torch.Tensor:
        # masked: decay only the selected weights (at wd == 0 the term is +-0 anyway: no extra tensor)
        return p * wd if mask is None or not wd else _masked(p * wd, mask)

    @staticmethod
    def _apply_update(p: torch.Tensor, z: torch.Tensor, g: float, lr: float, wd: float, mask=None) -> None:
        # MeZO: theta = theta - lr * (g * z + wd * theta); kept in this one form so replay matches bits
        if wd:
            p.sub_((z * g + ZOSGD._decay(p, wd, mask)) * lr)
        else:
            p.sub_(z * (g * lr))

    @staticmethod
    def _mezo_update(p: torch.Tensor, z: torch.Tensor, g: float, lr: float, wd: float, decayed: bool,
                     mask=None, scratch: torch.Tensor | None = None) -> None:
        """MeZO's zo_update, op for op (the wd term is computed even when wd == 0):
        decayed ``p.data = p.data - lr * (g * z + wd * p.data)``, else ``p.data = p.data - lr * (g * z)``;
        in place: z (consumed) holds each intermediate and ``scratch`` (p's shape) the wd term."""
        z.mul_(g)
        if decayed:
            term = torch.mul(p, wd, out=scratch) if scratch is not None else p * wd
            if mask is not None and wd:
                _masked(term, mask)
            z.add_(term)
        p.sub_(z.mul_(lr))

    def _buffer(self, device: torch.device, dtype: torch.dtype, tag: str, n: int) -> torch.Tensor:
        """A flat buffer of at least ``n`` elements, kept and reused from step to step (grown when too small)."""
        key = (device, dtype, tag)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            self._buffers.pop(key, None)
            buf = self._buffers[key] = torch.empty(n, device=device, dtype=dtype)
        return buf[:n]

    def _scratch(self, device: torch.device, dtype: torch.dtype, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two reusable flat buffers of ``n`` elements (z and the wd term of one chunk)."""
        return self._buffer(device, dtype, "z", n), self._buffer(device, dtype, "wd", n)

    def _mask_buffers(self, device: torch.device, dtype: torch.dtype, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reusable buffers for a BitMask's chunk of ``n`` elements unpacked in ``dtype``: the mask and its bytes
        as int64 indices (``BitMask.chunk``)."""
        n = (n + 7) // 8 * 8
        return self._buffer(device, dtype, "mask", n), self._buffer(device, torch.int64, "mask index", n // 8)

    @torch.no_grad()
    def _mezo_pass(self, seed: int, op) -> None:
        """``op(group, p_chunk, z_chunk, mask_chunk, scratch)`` over every tuned tensor, chunk by chunk, with
        the z of ``_draw(seed)``: the same generator, the same values, the same bits as MeZO's whole-tensor
        arithmetic (every op is elementwise and the same kernel runs in place), but the only temporaries are
        two buffers of CHUNK elements (MeZO's out-of-place ``p.data = ...`` holds three copies of the largest
        tensor). On CPU z is drawn chunk by chunk: torch's CPU normal sampler fills blocks of 16 values from
        consecutive uniforms and redraws the last 16 when the size is not a multiple of 16, so chunks of a
        multiple of 16 elements, the remainder folded into the last chunk when it is under 16, give the whole
        tensor's draw bit for bit and leave the generator where it would be (tests/test_zo.py checks it). On
        other devices (counter-based generators), z is drawn whole per tensor as before, then used in place."""
        for group, p, mask, gen in self._seeded(seed):
            data = p.data
            if data.device.type != "cpu" or not data.is_contiguous():
                z = torch.randn(data.shape, generator=gen, device=data.device, dtype=data.dtype)
                if mask is not None:
                    _masked(z, mask)
                op(group, data, z, mask, None)
                del z
                continue
            flat = data.view(-1)
            for b, e in _chunks(flat.numel(), self.chunk):
                z, scratch = self._scratch(flat.device, flat.dtype, e - b)
                torch.randn(e - b, generator=gen, device=flat.device, dtype=flat.dtype, out=z)
                m = None
                if mask is not None:
                    m = _mask_span(mask, b, e, *self._mask_buffers(flat.device, flat.dtype, e - b))
                    z.mul_(m)
                op(group, flat[b:e], z, m, scratch)

    @torch.no_grad()
    def _update(self, seed: int, g: float, zs: list | None = None) -> None:
        items = (zip(self._params(), zs) if zs is not None
                 else (((gr, p, m), z) for gr, p, z, m in self._draw(seed)))
        if self.restore == "mezo":
            def update(group, p, z, mask, scratch):
                self._mezo_update(p, z, g, group["lr"], group["weight_decay"], group.get("decay", True), mask,
                                  scratch)
            self._mezo_pass(seed, update)
            return
        for (group, p, mask), z in items:
            self._apply_update(p, z, g, group["lr"], group["weight_decay"], mask)

    @torch.no_grad()
    def _fused_update(self, seed: int, eps: float, g: float) -> None:
        """Restore and update with one draw of z: theta = (theta_minus + eps*z) - lr*(g*z + wd*theta)."""
        for group, p, z, mask in self._draw(seed):
            p.add_(z, alpha=eps)
            self._apply_update(p, z, g, group["lr"], group["weight_decay"], mask)

    def _timed(self, key: str, fn, *args):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = _now()
        out = fn(*args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.timing[key] += _now() - t0
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], float | torch.Tensor] | None = None,  # type: ignore[override]
             pair_closure: Callable | None = None) -> float:
        """One SPSA step. ``closure()`` returns the loss at the current parameters; alternatively
        ``pair_closure(set_plus, set_minus)`` returns (L+, L-) itself, calling ``set_plus()`` then
        ``set_minus()`` to move the parameters (so it can share work between the two evaluations)."""
        pair_closure = self._pair(closure, pair_closure)
        step = self.steps_done
        seed = step_seed(self.seed, step)
        eps = self.param_groups[0]["eps"]
        lr = self.param_groups[0]["lr"]
        l_plus, l_minus, zs = self._paired(pair_closure, seed, eps)
        if not (math.isfinite(l_plus) and math.isfinite(l_minus)):
            if self.restore == "fused":  # leave theta as it was before the step
                self._perturb(seed, 1, eps)
            raise NonFiniteLoss(step, l_plus, l_minus)
        g = (l_plus - l_minus) / (2 * eps)
        if self.restore == "fused":
            self._timed("update_s", self._fused_update, seed, eps, g)
        else:
            self._timed("update_s", self._update, seed, g, zs)
        self.trajectory.append({"step": step, "seed": seed, "g": g, "lr": lr, "eps": eps,
                                "loss_plus": l_plus, "loss_minus": l_minus})
        self.steps_done += 1
        return g

    @staticmethod
    def _pair(closure, pair_closure) -> Callable:
        """The pair_closure that ``step``/``projected_gradient`` run: ``pair_closure`` or one built on ``closure``."""
        if (closure is None) == (pair_closure is None):
            raise ValueError("ZOSGD needs a closure that returns the loss (or a pair_closure, not both)")
        if pair_closure is not None:
            return pair_closure

        def paired(set_plus, set_minus):
            set_plus()
            l_plus = float(closure())
            set_minus()
            return l_plus, float(closure())
        return paired

    def _paired(self, pair_closure, seed: int, eps: float):
        """(L+, L-, kept z or None) from ``pair_closure``; parameters left where ``step`` expects them."""
        if self.restore == "exact":  # z drawn once and kept; theta saved and copied back bit for bit
            def prepare():
                pairs = [(p, z) for _, p, z, _ in self._draw(seed)]
                return pairs, [p.detach().clone() for p, _ in pairs]

            pairs, saved = self._timed("perturb_s", prepare)

            def shift(scale):
                for (p, z), orig in zip(pairs, saved):
                    p.copy_(orig).add_(z, alpha=scale)

            set_plus = lambda: self._timed("perturb_s", shift, eps)  # noqa: E731
            set_minus = lambda: self._timed("perturb_s", shift, -eps)  # noqa: E731
        else:  # in place; z regenerated from the seed at each use
            set_plus = lambda: self._timed("perturb_s", self._perturb, seed, 1, eps)  # noqa: E731
            set_minus = lambda: self._timed("perturb_s", self._perturb, seed, -2, eps)  # noqa: E731
        t_perturb, t0 = self.timing["perturb_s"], _now()
        try:
            l_plus, l_minus = (float(x) for x in pair_closure(set_plus, set_minus))  # timed as forward
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.timing["forward_s"] += _now() - t0 - (self.timing["perturb_s"] - t_perturb)
        finally:  # exact: theta copied back also when the closure raises
            if self.restore == "exact":
                self._timed("perturb_s", lambda: [p.copy_(orig) for (p, _), orig in zip(pairs, saved)])
        if self.restore == "exact":
            return l_plus, l_minus, [z for _, z in pairs]
        if self.restore == "mezo":
            self._timed("perturb_s", self._perturb, seed, 1, eps)
        return l_plus, l_minus, None

    @torch.no_grad()
    def replay(self, records: Iterable[dict]) -> None:
        """Re-apply recorded steps to the current parameters (the same ops, hence the same bits)."""
        for rec in records:
            seed, g, lr = int(rec["seed"]), float(rec["g"]), float(rec["lr"])
            eps = float(rec.get("eps", self.param_groups[0]["eps"]))
            if self.restore in ("mezo", "fused"):  # the in-place round trip leaves rounding residue: redo it
                self._perturb(seed, 1, eps)
                self._perturb(seed, -2, eps)
                if self.restore == "mezo":
                    self._perturb(seed, 1, eps)
            for group in self.param_groups:
                group["lr"] = lr
            if self.restore == "fused":
                self._fused_update(seed, eps, g)
            else:
                self._update(seed, g)
            self.trajectory.append(dict(rec))
            self.steps_done += 1
