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
        code=src("train", "zo", "objectives", "models", "tasks"),
    params:
        args=train_args,
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
        "python -m dlzo.train --model {input.model} --model-name {wildcards.model} "
        "--data $(dirname {input.train}) --task {wildcards.task} --method {wildcards.method} "
        "--seed {wildcards.seed} --out $(dirname {output.log}) {params.probe} {params.args} "
        "{params.runtime} > {log} 2>&1"
