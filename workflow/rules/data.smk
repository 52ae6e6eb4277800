rule prepare_data:
    output:
        train=L.data("{model}", "{task}", "train"),
        dev=L.data("{model}", "{task}", "dev"),
        test=L.data("{model}", "{task}", "test"),
        meta=L.data_meta("{model}", "{task}"),
    input:
        # the model's tokenizer: meta.json counts the records that train.max_len truncates (MeZO's rule)
        model=rules.download_model.output,
        code=code("data"),
    params:
        source=lambda w: config["tasks"][w.task]["source"],
        sizes=lambda w: cli(**{k: config["tasks"][w.task].get(k) or None for k in ("train", "dev", "test")}),
        seed=config["data_seed"],
        max_len=config["train"]["max_len"],
    log:
        L.log("prepare_data", "{model}/{task}"),
    benchmark:
        L.benchmark("prepare_data", "{model}/{task}")
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m dlzo.data --task {wildcards.task} --source '{params.source}' --seed {params.seed} "
        "{params.sizes} --tokenizer {input.model} --max-len {params.max_len} --out $(dirname {output.meta}) "
        "> {log} 2>&1"
