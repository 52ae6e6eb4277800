# A checkpoint: the dominant layer (first activation-outlier layer) is only known once this has run.
checkpoint probe_outliers:
    output:
        json=f"{RESULTS}/probe/{{model}}/probe.json",
        png=report(f"{RESULTS}/probe/{{model}}/activation_profile.png",
                   caption="../report/probe.rst", category="Probe"),
    input:
        model=rules.download_model.output,
        code=src("probe", "models"),
    params:
        # a string, not the config dict: a dict's key order would count as a change of parameters
        probe=lambda w: " ".join(f"--{k.replace('_', '-')} {config['probe'][k]}"
                                 for k in ("abs_threshold", "ratio_threshold", "n_seqs", "max_len")),
        runtime=runtime_args(),
    log:
        f"{RESULTS}/logs/probe_outliers/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/probe_outliers/{{model}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: config.get("runtime", {}).get("threads") or 1
    resources:
        gpu=gpu_count,
        mem_mb=mem_mb,
        runtime=runtime_min,
    shell:
        "python -m dlzo.probe --model {input.model} --out {output.json} --plot {output.png} "
        "{params.probe} {params.runtime} > {log} 2>&1"


# The perturbation-sensitivity profile: per layer, k single-layer ZO perturbations on training batches
# (inference only). Beside the probe; it reads the probe's JSON only to mark its layer in the figure.
rule probe_sensitivity:
    output:
        json=f"{RESULTS}/probe/{{model}}/sensitivity.json",
        png=report(f"{RESULTS}/probe/{{model}}/sensitivity_profile.png",
                   caption="../report/sensitivity.rst", category="Probe"),
    input:
        model=rules.download_model.output,
        train=lambda w: f"{RESULTS}/data/{sensitivity_task()}/train.jsonl",
        probe=rules.probe_outliers.output.json,
        code=src("probe", "objectives", "zo", "models", "tasks", "train"),
    params:
        task=lambda w: sensitivity_task(),
        args=lambda w: " ".join(f"--{k.replace('_', '-')} {config['probe']['sensitivity'][k]}"
                                for k in ("k", "batches", "batch_size", "eps", "max_len", "seed"))
        + scoring_args(sensitivity_task()),
        runtime=runtime_args(),
    log:
        f"{RESULTS}/logs/probe_sensitivity/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/probe_sensitivity/{{model}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: config.get("runtime", {}).get("threads") or 1
    resources:
        gpu=gpu_count,
        mem_mb=mem_mb,
        runtime=runtime_min,
    shell:
        "python -m dlzo.probe sensitivity --model {input.model} --data {input.train} --task {params.task} "
        "--probe {input.probe} --out {output.json} --plot {output.png} {params.args} {params.runtime} "
        "> {log} 2>&1"


# Per-layer first-order gradient norms (backprop on a few training batches, near-inference memory), and
# the figure that puts the three predictors of the layer to tune (outlier profile, ZO sensitivity, gradient
# norm) on one layer axis.
rule probe_gradnorm:
    output:
        json=f"{RESULTS}/probe/{{model}}/gradnorm.json",
        png=report(f"{RESULTS}/probe/{{model}}/layer_predictors.png",
                   caption="../report/layer_predictors.rst", category="Probe"),
    input:
        model=rules.download_model.output,
        train=lambda w: f"{RESULTS}/data/{gradnorm_task()}/train.jsonl",
        probe=rules.probe_outliers.output.json,
        sensitivity=rules.probe_sensitivity.output.json,
        code=src("probe", "objectives", "models", "tasks", "train"),
    params:
        task=lambda w: gradnorm_task(),
        args=lambda w: " ".join(f"--{k.replace('_', '-')} {config['probe']['gradnorm'][k]}"
                                for k in ("batches", "batch_size", "max_len", "seed"))
        + scoring_args(gradnorm_task()),
        runtime=runtime_args(),
    log:
        f"{RESULTS}/logs/probe_gradnorm/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/probe_gradnorm/{{model}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: config.get("runtime", {}).get("threads") or 1
    resources:
        gpu=gpu_count,
        mem_mb=mem_mb,
        runtime=runtime_min,
    shell:
        "python -m dlzo.probe gradnorm --model {input.model} --data {input.train} --task {params.task} "
        "--probe {input.probe} --sensitivity {input.sensitivity} --out {output.json} --plot {output.png} "
        "{params.args} {params.runtime} > {log} 2>&1"
