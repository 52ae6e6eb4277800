"""The one vocabulary of methods: names, their families, grid tags, table order and the dominant layer.

Torch-free (the workflow's ``common.smk`` and the tables stage import it). Every other module asks
this one what a method name means instead of matching names itself; a new method family is a new
entry in ``KINDS`` (and the code that implements it), nothing else.

    zero-shot, calibrated-zero-shot   the frozen model (evaluated, never trained)
    mezo-full                         ZO-SGD on every parameter (MeZO)
    sparse-mezo                       ZO-SGD on the smallest-magnitude weights of every tensor
    lora-zo                           ZO-SGD on LoRA adapters in every layer
    layer-<i>                         ZO-SGD on decoder layer i (the sweep)
    dominant                          layer-<i> with i the probe's first outlier layer, or pinned
    layer-<i>-lora, dominant-lora     ZO-SGD on LoRA adapters inside one layer
    fo-adamw, fo-layer-<i>            first-order AdamW on every parameter, or on decoder layer i

A grid point's run folder is ``<method>@lr<lr>[_eps<eps>]`` (``grid_tag``/``parse_grid_tag``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dlzo import DLZOError
from dlzo.io import read_json


@dataclass(frozen=True)
class Kind:
    """A family of methods: how they train and which hyperparameter block (``train.hyper.<family>``) they use."""
    name: str            # the kind the trainer dispatches on
    family: str          # train.hyper block
    fo: bool = False     # first-order (backprop) instead of ZO-SGD
    lora: bool = False   # tunes LoRA adapters
    layer: bool = False  # tunes one decoder layer (or adapters inside it)


KINDS = {k.name: k for k in [
    Kind("mezo-full", "full"),
    Kind("sparse-mezo", "sparse"),
    Kind("lora-zo", "lora", lora=True),
    Kind("layer", "layer", layer=True),
    Kind("layer-lora", "layer-lora", lora=True, layer=True),
    Kind("fo-full", "fo", fo=True),
    Kind("fo-layer", "fo", fo=True, layer=True),
]}
EVAL_ONLY = ("zero-shot", "calibrated-zero-shot")
# a ZO run tuning more parameters than this saves its trajectory instead of its tensors (`--save-tuned auto`:
# a 7B mezo-full run's weights are 13 GB a run; evaluation replays the trajectory), here for dlzo.cluster's disk
SAVE_TENSORS_UP_TO = 500_000_000  # the frozen model: no training run
# name pattern -> (kind, whether the layer comes from the probe); (\d+) is the layer index
_GRAMMAR = [
    (re.compile(r"mezo-full"), "mezo-full", False),
    (re.compile(r"sparse-mezo"), "sparse-mezo", False),
    (re.compile(r"lora-zo"), "lora-zo", False),
    (re.compile(r"layer-(\d+)"), "layer", False),
    (re.compile(r"layer-(\d+)-lora"), "layer-lora", False),
    (re.compile(r"dominant"), "layer", True),
    (re.compile(r"dominant-lora"), "layer-lora", True),
    (re.compile(r"fo-adamw"), "fo-full", False),
    (re.compile(r"fo-layer-(\d+)"), "fo-layer", False),
]
NAMES = ("mezo-full, sparse-mezo, lora-zo, dominant, dominant-lora, fo-adamw, layer-<i>, layer-<i>-lora, "
         "fo-layer-<i>")
BEST_LAYER = "best layer (dev)"  # the tables' row: the sweep layer with the lowest dev loss
# Row order of every table: the paper's order first; a method named nowhere here falls in at the end,
# alphabetically, so a new method shows up without a code change. Patterns sort by their layer index.
TABLE_ORDER = ["zero-shot", "calibrated-zero-shot", "mezo-full", "lora-zo", "sparse-mezo", "dominant",
               "dominant-lora", BEST_LAYER, "fo-adamw", r"fo-layer-\d+", r"layer-\d+", r"layer-\d+-lora"]


@dataclass(frozen=True)
class Method:
    """What a method name means. ``layer`` is None for whole-model methods and for the dominant ones
    (their layer is resolved from the probe or the pin: ``dominant_layer``)."""
    name: str
    kind: str
    layer: int | None = None
    dominant: bool = False

    @property
    def spec(self) -> Kind:
        return KINDS[self.kind]

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def is_fo(self) -> bool:
        return self.spec.fo

    @property
    def is_lora(self) -> bool:
        return self.spec.lora

    @property
    def is_single_layer(self) -> bool:
        """Tunes one decoder layer or the adapters inside it (the dominant methods included)."""
        return self.spec.layer

    @property
    def is_sweep(self) -> bool:
        """A run of the single-layer sweep (``layer-<i>``)."""
        return self.kind == "layer" and not self.dominant

    @property
    def is_dominant(self) -> bool:
        return self.dominant


def parse_method(name: str) -> Method:
    """``layer-3`` -> Method(kind 'layer', layer 3); ``dominant`` -> Method(kind 'layer', dominant); ...

    A grid point's folder name (``<method>@lr...``) is not a method: ``base_method`` first."""
    for pattern, kind, dominant in _GRAMMAR:
        m = pattern.fullmatch(name)
        if m:
            return Method(name, kind, int(m.group(1)) if m.groups() else None, dominant)
    raise DLZOError(f"unknown method {name!r}: expected {NAMES}")


def is_sweep(name: str) -> bool:
    """Whether ``name`` (a method or a table's method column) is a run of the single-layer sweep."""
    return bool(re.fullmatch(r"layer-\d+", name))


def is_dominant(name: str) -> bool:
    """Whether a table's method row is a dominant-layer method (its layer comes from the probe or the pin)."""
    try:
        return parse_method(name).is_dominant
    except DLZOError:
        return False


def tunes_one_layer(name: str) -> bool:
    """Whether a table's method row tunes one layer (the sweep figure draws these at their layer, not as lines)."""
    try:
        return parse_method(name).is_single_layer
    except DLZOError:
        return False


def sweep_method(layer: int) -> str:
    return f"layer-{int(layer)}"


def sweep_layer(name: str) -> int:
    """The layer index of a sweep run's name ('layer-7' -> 7)."""
    if not is_sweep(name):
        raise DLZOError(f"{name!r} is not a sweep run (layer-<i>)")
    return int(name[len("layer-"):])


def hyper_block(name: str, hyper: dict) -> str:
    """The ``train.hyper`` block a method reads: its family's, or ``sweep`` for the sweep when that block exists."""
    method = parse_method(name)
    return "sweep" if method.is_sweep and "sweep" in hyper else method.family


# ------------------------------------------------------------------------------------------- grid tags

def grid_tag(lr: float, eps: float | None) -> str:
    """The run-folder suffix of a grid point: '@lr1e-05_eps0.001' (no eps for first-order methods)."""
    return f"@lr{lr:g}" + (f"_eps{eps:g}" if eps is not None else "")


def base_method(folder: str) -> str:
    """The method of a run folder name: 'mezo-full@lr1e-05_eps0.001' -> 'mezo-full'."""
    return folder.split("@", 1)[0]


def is_grid_point(folder: str) -> bool:
    return "@" in folder


# ------------------------------------------------------------------------------------------ table order

def method_key(method: str) -> tuple:
    for rank, entry in enumerate(TABLE_ORDER):
        if "\\d" in entry:  # a pattern: its members sort by their layer index
            if re.fullmatch(entry, method):
                return rank, int(re.search(r"\d+", method).group()), method
        elif method == entry:
            return rank, 0, method
    return len(TABLE_ORDER), 0, method


def order_methods(methods) -> list[str]:
    """The methods in the tables' row order (the paper's first, then the rest alphabetically)."""
    return sorted(set(methods), key=method_key)


# -------------------------------------------------------------------------------------- dominant layer

def check_layer_index(layer, num_layers: int | None, where: str) -> int:
    """``layer`` as an int in 0..num_layers-1 (num_layers None: only >= 0), else an error naming ``where``."""
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise DLZOError(f"{where}: expected a 0-based layer index, got {layer!r}")
    if num_layers is not None and layer >= num_layers:
        raise DLZOError(f"{where}: layer index {layer} is past the model's depth "
                        f"({num_layers} decoder layers, indices 0..{num_layers - 1})")
    return layer


def resolve_layer(method: Method, probe_json: str | Path | None, pinned: int | None,
                  model_name: str) -> tuple[int | None, str | None]:
    """(layer, how) of a method: its own index ('method name'), the pin ('pinned') or the probe's first
    outlier layer ('probe') for the dominant methods, (None, None) for whole-model methods. The one place
    the dominant layer is decided and range-checked against the probe's depth (the trainer checks it
    against the model it builds)."""
    if not method.dominant:
        return method.layer, ("method name" if method.layer is not None else None)
    probe = None
    if probe_json is not None and Path(probe_json).exists():
        probe = read_json(probe_json, "probe file")
    if pinned is not None:
        depth = probe.get("num_layers") if probe else None
        return check_layer_index(pinned, depth, f"config key dominant_layer: {model_name}"), "pinned"
    if probe_json is None:
        raise DLZOError(f"method {method.name} needs the probe's JSON (--probe) or a pinned layer (--layer)")
    if probe is None:
        raise DLZOError(f"probe file {probe_json} does not exist")
    if probe.get("first_outlier_layer") is not None:
        return int(probe["first_outlier_layer"]), "probe"
    t = probe.get("thresholds", {})
    raise DLZOError(
        f"the probe ({probe_json}) found no activation-outlier layer in {model_name} at thresholds "
        f"|h| > {t.get('abs')} and > {t.get('ratio')}x the median, so methods 'dominant' and "
        f"'dominant-lora' have no layer. Pin one in the config with the key `dominant_layer`, a mapping "
        f"from model name to 0-based layer index, e.g.\n  dominant_layer:\n    {model_name}: 3\n"
        f"(the per-layer table in {probe_json} shows max|h|, median|h| and their ratio per layer)")
