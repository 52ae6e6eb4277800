rule evaluate:
    output:
        f"{RESULTS}/eval/{{model}}/{{task}}/{{method}}/seed{{seed}}.json",
    wildcard_constraints:
        method="[^/@]+",
    input:
        model=rules.download_model.output,
        test=rules.prepare_data.output.test,
        run=lambda w: result_logs(w.model, w.task, w.method, w.seed),
        selection=lambda w: [selection_path(w.model, w.task, w.method)] if picks_from_grid(w.method, w.seed) else [],
        code=src("evaluate", "train", "models", "tasks"),
    params:
        # the run folder: the grid's chosen point, read from the selection when the job runs
        run=lambda w, input: f"$(python -m dlzo.select run {input.selection})" if input.selection
        else f"$(dirname {input.run[0]})",
        batch_size=config["evaluate"]["batch_size"],
        runtime=runtime_args(),
    log:
        f"{RESULTS}/logs/evaluate/{{model}}/{{task}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{model}}/{{task}}/{{method}}/seed{{seed}}.tsv"
    conda:
        "../../envs/evaluate.yaml"
    threads: config.get("runtime", {}).get("threads") or 1
    resources:
        gpu=gpu_count,
        mem_mb=mem_mb,
        runtime=runtime_min,
    shell:
        "RUN={params.run}; "
        "python -m dlzo.evaluate --model {input.model} --data $(dirname {input.test}) --task {wildcards.task} "
        "--run $RUN --method {wildcards.method} --seed {wildcards.seed} "
        "--tasks-dir $(dirname {output})/lm_eval_tasks/{wildcards.method}-seed{wildcards.seed} "
        "--batch-size {params.batch_size} {params.runtime} --out {output} > {log} 2>&1"


rule evaluate_zero_shot:
    output:
        f"{RESULTS}/eval/{{model}}/{{task}}/zero-shot.json",
    input:
        model=rules.download_model.output,
        test=rules.prepare_data.output.test,
        code=src("evaluate", "models", "tasks"),
    params:
        batch_size=config["evaluate"]["batch_size"],
        runtime=runtime_args(),
    log:
        f"{RESULTS}/logs/evaluate/{{model}}/{{task}}/zero-shot.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{model}}/{{task}}/zero-shot.tsv"
    conda:
        "../../envs/evaluate.yaml"
    threads: config.get("runtime", {}).get("threads") or 1
    resources:
        gpu=gpu_count,
        mem_mb=mem_mb,
        runtime=runtime_min,
    shell:
        "python -m dlzo.evaluate --model {input.model} --data $(dirname {input.test}) --task {wildcards.task} "
        "--method zero-shot --tasks-dir $(dirname {output})/lm_eval_tasks/zero-shot "
        "--batch-size {params.batch_size} {params.runtime} --out {output} > {log} 2>&1"


# The bias-only baseline of every multiple-choice task: the frozen model's candidate scores plus one
# offset per candidate, fitted on train (for each L2 strength) and the strength chosen on dev accuracy.
rule evaluate_calibrated:
    output:
        f"{RESULTS}/eval/{{model}}/{{task}}/calibrated-zero-shot.json",
    input:
        model=rules.download_model.output,
        train=rules.prepare_data.output.train,
        dev=rules.prepare_data.output.dev,
        test=rules.prepare_data.output.test,
        code=src("evaluate", "models", "tasks"),
    params:
        batch_size=config["evaluate"]["batch_size"],
        l2=" ".join(str(x) for x in config["evaluate"].get("calibration_l2", [0.0, 0.01, 0.1, 1.0])),
        runtime=runtime_args(),
    log:
        f"{RESULTS}/logs/evaluate/{{model}}/{{task}}/calibrated-zero-shot.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{model}}/{{task}}/calibrated-zero-shot.tsv"
    conda:
        "../../envs/evaluate.yaml"
    threads: config.get("runtime", {}).get("threads") or 1
    resources:
        gpu=gpu_count,
        mem_mb=mem_mb,
        runtime=runtime_min,
    shell:
        "python -m dlzo.evaluate --model {input.model} --data $(dirname {input.test}) --task {wildcards.task} "
        "--method calibrated-zero-shot --calibrate --calibration-l2 {params.l2} "
        "--tasks-dir $(dirname {output})/lm_eval_tasks/calibrated-zero-shot "
        "--batch-size {params.batch_size} {params.runtime} --out {output} > {log} 2>&1"
