rule zo_train:
    output:
        log=f"{RESULTS}/train/{{model}}/{{task}}/{{method}}/seed{{seed}}/log.json",
        tuned=f"{RESULTS}/train/{{model}}/{{task}}/{{method}}/seed{{seed}}/tuned.safetensors",
        trajectory=f"{RESULTS}/train/{{model}}/{{task}}/{{method}}/seed{{seed}}/trajectory.jsonl",
    input:
        model=rules.download_model.output,
        train=rules.prepare_data.output.train,
        dev=rules.prepare_data.output.dev,
        probe=probe_input,
        # a grid method's other seeds train at the point its first seed chose on dev
        selection=lambda w: [selection_path(w.model, w.task, w.method)]
        if hyper_grid(w.method) and "@" not in w.method else [],
        code=src("train", "zo", "objectives", "models", "tasks"),
    params:
        method=lambda w: base_method(w.method),  # a grid point's folder is <method>@lr<lr>[_eps<eps>]
        args=train_args,
        # read when the job runs (an assignment of its own, so a failure stops the job): --lr and --eps
        hyper=lambda w, input: f"$(python -m dlzo.select args {input.selection})" if input.selection else '""',
        runtime=runtime_args(),
        probe=lambda w, input: f"--probe {input.probe}" if input.probe else "",
    log:
        f"{RESULTS}/logs/zo_train/{{model}}/{{task}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/zo_train/{{model}}/{{task}}/{{method}}/seed{{seed}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: config.get("runtime", {}).get("threads") or 1
    resources:
        gpu=gpu_count,
        mem_mb=mem_mb,
        runtime=runtime_min,
    shell:
        "HYPER={params.hyper}; "
        "python -m dlzo.train --model {input.model} --model-name {wildcards.model} "
        "--data $(dirname {input.train}) --task {wildcards.task} --method {params.method} "
        "--seed {wildcards.seed} --out $(dirname {output.log}) {params.probe} {params.args} $HYPER "
        "{params.runtime} > {log} 2>&1"


# The grid search of a method whose lr or eps is a list: every point trains with the method's first seed,
# and the lowest dev loss chooses the point that the other seeds train at. Not a checkpoint: the jobs that
# need the choice read it when they run (a checkpoint whose output is missing while the tables exist is
# not rerun by Snakemake 9, so adding a task would plan nothing).
rule select_hyper:
    output:
        f"{RESULTS}/train/{{model}}/{{task}}/{{method}}/hyper_selection.json",
    input:
        logs=lambda w: [f"{RESULTS}/train/{w.model}/{w.task}/{run}/seed{method_seeds(w.method)[0]}/log.json"
                        for run in grid_runs(w.model, w.task, w.method)],
        code=src("select"),
    wildcard_constraints:
        method="[^/@]+",
    log:
        f"{RESULTS}/logs/select_hyper/{{model}}/{{task}}/{{method}}.log",
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m dlzo.select --logs {input.logs} --out {output} > {log} 2>&1"
