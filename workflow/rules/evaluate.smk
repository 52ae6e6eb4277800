rule evaluate:
    output:
        f"{RESULTS}/eval/{{model}}/{{task}}/{{method}}/seed{{seed}}.json",
    input:
        model=rules.download_model.output,
        test=rules.prepare_data.output.test,
        run=rules.zo_train.output.log,
        code=src("evaluate", "train", "models", "tasks"),
    params:
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
        "python -m dlzo.evaluate --model {input.model} --data $(dirname {input.test}) --task {wildcards.task} "
        "--run $(dirname {input.run}) --method {wildcards.method} --seed {wildcards.seed} "
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
