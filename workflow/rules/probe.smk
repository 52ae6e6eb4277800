# The outlier probe: the dominant layer (first activation-outlier layer). A plain rule, not a checkpoint: the
# DAG's shape does not depend on its output (the dominant methods' jobs read the layer from probe.json when
# they run), so nothing waits on it to plan.
rule probe_outliers:
    output:
        json=L.probe("{model}"),
    input:
        model=rules.download_model.output,
        code=code("probe"),
    params:
        # a string, not the config dict: a dict's key order would count as a change of parameters
        probe=lambda w: cli(**{k: config["probe"][k] for k in ("abs_threshold", "ratio_threshold", "n_seqs", "max_len")}),
        runtime=runtime_args,
    log:
        L.log("probe_outliers", "{model}"),
    benchmark:
        L.benchmark("probe_outliers", "{model}")
    conda:
        "../../envs/train.yaml"
    threads: THREADS
    resources:
        **gpu_resources("probe_outliers"),
    shell:
        "python -m dlzo.probe --model {input.model} --out {output.json} "
        "{params.probe} {params.runtime} > {log} 2>&1"


# The perturbation-sensitivity profile: per layer, k single-layer ZO perturbations on training batches
# (inference only). Beside the probe; it reads the probe's JSON only to record its layer's rank.
rule probe_sensitivity:
    output:
        json=L.probe("{model}", "sensitivity"),
    input:
        model=rules.download_model.output,
        train=lambda w: L.data(w.model, profile_task("sensitivity"), "train"),
        probe=rules.probe_outliers.output.json,
        code=code("profiles"),
    params:
        task=lambda w: profile_task("sensitivity"),
        args=lambda w: profile_args("sensitivity", ("k", "batches", "batch_size", "eps", "max_len", "seed")),
        runtime=runtime_args,
    log:
        L.log("probe_sensitivity", "{model}"),
    benchmark:
        L.benchmark("probe_sensitivity", "{model}")
    conda:
        "../../envs/train.yaml"
    threads: THREADS
    resources:
        **gpu_resources("probe_sensitivity"),
    shell:
        "python -m dlzo.profiles sensitivity --model {input.model} --data {input.train} --task {params.task} "
        "--probe {input.probe} --out {output.json} {params.args} {params.runtime} > {log} 2>&1"


# Per-layer first-order gradient norms (backprop on a few training batches, near-inference memory).
rule probe_gradnorm:
    output:
        json=L.probe("{model}", "gradnorm"),
    input:
        model=rules.download_model.output,
        train=lambda w: L.data(w.model, profile_task("gradnorm"), "train"),
        probe=rules.probe_outliers.output.json,
        code=code("profiles"),
    params:
        task=lambda w: profile_task("gradnorm"),
        args=lambda w: profile_args("gradnorm", ("batches", "batch_size", "max_len", "seed")),
        runtime=runtime_args,
    log:
        L.log("probe_gradnorm", "{model}"),
    benchmark:
        L.benchmark("probe_gradnorm", "{model}")
    conda:
        "../../envs/train.yaml"
    threads: THREADS
    resources:
        **gpu_resources("probe_gradnorm"),
    shell:
        "python -m dlzo.profiles gradnorm --model {input.model} --data {input.train} --task {params.task} "
        "--probe {input.probe} --out {output.json} {params.args} {params.runtime} > {log} 2>&1"


# The probe stages' figures, drawn from their JSON apart from the GPU jobs (an edit to dlzo.figures redraws
# these and reruns no probe): the outlier profile, the ZO sensitivity profile, and the three predictors of the
# layer to tune (outlier profile, ZO sensitivity, gradient norm) on one layer axis.
rule plot_probe:
    output:
        report(L.probe("{model}", "probe_png"), caption="../report/probe.rst", category="Probe"),
    input:
        probe=rules.probe_outliers.output.json,
        code=code("figures"),
    log:
        L.log("plot_probe", "{model}"),
    conda:
        "../../envs/tables.yaml"
    shell:
        "python -m dlzo.figures profile --probe {input.probe} --out {output} > {log} 2>&1"


rule plot_sensitivity:
    output:
        report(L.probe("{model}", "sensitivity_png"), caption="../report/sensitivity.rst", category="Probe"),
    input:
        sensitivity=rules.probe_sensitivity.output.json,
        code=code("figures"),
    log:
        L.log("plot_sensitivity", "{model}"),
    conda:
        "../../envs/tables.yaml"
    shell:
        "python -m dlzo.figures sensitivity --sensitivity {input.sensitivity} --out {output} > {log} 2>&1"


rule plot_predictors:
    output:
        report(L.probe("{model}", "predictors_png"), caption="../report/layer_predictors.rst", category="Probe"),
    input:
        probe=rules.probe_outliers.output.json,
        sensitivity=rules.probe_sensitivity.output.json,
        gradnorm=rules.probe_gradnorm.output.json,
        code=code("figures"),
    log:
        L.log("plot_predictors", "{model}"),
    conda:
        "../../envs/tables.yaml"
    shell:
        "python -m dlzo.figures predictors --probe {input.probe} --sensitivity {input.sensitivity} "
        "--gradnorm {input.gradnorm} --out {output} > {log} 2>&1"
