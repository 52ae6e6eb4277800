rule download_model:
    output:
        directory(L.model("{model}")),
    input:
        code("download"),
    params:
        source=lambda w: config["models"][w.model]["source"],
        num_layers=lambda w: config["models"][w.model]["num_layers"],
    log:
        L.log("download_model", "{model}"),
    benchmark:
        L.benchmark("download_model", "{model}")
    conda:
        "../../envs/models.yaml"
    resources:
        **DOWNLOAD_RESOURCES,
    shell:
        "python -m dlzo.download --source '{params.source}' --out {output} "
        "--num-layers {params.num_layers} > {log} 2>&1"
