rule prepare_data:
    output:
        train=f"{RESULTS}/data/{{task}}/train.jsonl",
        dev=f"{RESULTS}/data/{{task}}/dev.jsonl",
        test=f"{RESULTS}/data/{{task}}/test.jsonl",
        meta=f"{RESULTS}/data/{{task}}/meta.json",
    input:
        src("data", "tasks"),
    params:
        source=lambda w: config["tasks"][w.task]["source"],
        sizes=lambda w: " ".join(f"--{k} {config['tasks'][w.task][k]}"
                                 for k in ("train", "dev", "test") if config["tasks"][w.task].get(k)),
        seed=config["data_seed"],
    log:
        f"{RESULTS}/logs/prepare_data/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_data/{{task}}.tsv"
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m dlzo.data --task {wildcards.task} --source '{params.source}' --seed {params.seed} "
        "{params.sizes} --out $(dirname {output.meta}) > {log} 2>&1"
