# One training job per run of the run table (common.smk): a method's run folder, or a grid point's
# <method>@lr<lr>[_eps<eps>], whose lr and eps the table holds.
rule zo_train:
    output:
        log=L.train_log("{model}", "{task}", "{method}", "{seed}"),
        tuned=L.path("tuned", model="{model}", task="{task}", run="{method}", seed="{seed}"),
        trajectory=L.path("trajectory", model="{model}", task="{task}", run="{method}", seed="{seed}"),
    input:
        model=rules.download_model.output,
        train=rules.prepare_data.output.train,
        dev=rules.prepare_data.output.dev,
        probe=probe_input,
        # a grid method's other seeds train at the point its first seed chose on dev (read when the job runs)
        selection=train_selection,
        code=code("train"),
    params:
        method=lambda w: run_of(w).method,
        args=train_args,
        selection=lambda w, input: cli(selection=input.selection[0] if input.selection else None),
        probe=lambda w, input: cli(probe=input.probe[0] if input.probe else None),
        runtime=lambda w: runtime_args(w, training=True),
    log:
        L.log("zo_train", "{model}/{task}/{method}/seed{seed}"),
    benchmark:
        L.train_benchmark("{model}", "{task}", "{method}", "{seed}")
    conda:
        "../../envs/train.yaml"
    threads: THREADS
    resources:
        **gpu_resources("zo_train"),
    shell:
        "python -m dlzo.train --model {input.model} --model-name {wildcards.model} "
        "--data $(dirname {input.train}) --task {wildcards.task} --method {params.method} "
        "--seed {wildcards.seed} --out $(dirname {output.log}) {params.probe} {params.args} {params.selection} "
        "{params.runtime} > {log} 2>&1"


# The grid search of a method whose lr or eps is a list: every point trains with the method's first seed,
# and the lowest dev loss chooses the point that the other seeds train at. Not a checkpoint: the jobs that
# need the choice read it when they run (a checkpoint whose output is missing while the tables exist is
# not rerun by Snakemake 9, so adding a task would plan nothing).
rule select_hyper:
    output:
        L.selection("{model}", "{task}", "{method}"),
    input:
        logs=grid_logs,
        code=code("select"),
    wildcard_constraints:
        method="[^/@]+",
    log:
        L.log("select_hyper", "{model}/{task}/{method}"),
    conda:
        "../../envs/tables.yaml"
    shell:
        "python -m dlzo.select --logs {input.logs} --out {output} > {log} 2>&1"
