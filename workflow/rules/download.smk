rule download_model:
    output:
        directory(f"{RESULTS}/models/{{model}}"),
    input:
        src("download", "models"),
    params:
        source=lambda w: config["models"][w.model]["source"],
        num_layers=lambda w: config["models"][w.model]["num_layers"],
    log:
        f"{RESULTS}/logs/download_model/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/download_model/{{model}}.tsv"
    conda:
        "../../envs/models.yaml"
    resources:
        mem_mb=mem_mb,
    shell:
        "python -m dlzo.download --source '{params.source}' --out {output} "
        "--num-layers {params.num_layers} > {log} 2>&1"
