rule prepare_data:
    output:
        train=L.data("{task}", "train"),
        dev=L.data("{task}", "dev"),
        test=L.data("{task}", "test"),
        meta=L.data_meta("{task}"),
    input:
        code("data"),
    params:
        source=lambda w: config["tasks"][w.task]["source"],
        sizes=lambda w: cli(**{k: config["tasks"][w.task].get(k) or None for k in ("train", "dev", "test")}),
        seed=config["data_seed"],
    log:
        L.log("prepare_data", "{task}"),
    benchmark:
        L.benchmark("prepare_data", "{task}")
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m dlzo.data --task {wildcards.task} --source '{params.source}' --seed {params.seed} "
        "{params.sizes} --out $(dirname {output.meta}) > {log} 2>&1"
