# A checkpoint: the dominant layer (first activation-outlier layer) is only known once this has run.
checkpoint probe_outliers:
    output:
        json=f"{RESULTS}/probe/{{model}}/probe.json",
        png=report(f"{RESULTS}/probe/{{model}}/activation_profile.png",
                   caption="../report/probe.rst", category="Probe"),
    input:
        model=rules.download_model.output,
        code=src("probe", "models"),
    params:
        # a string, not the config dict: a dict's key order would count as a change of parameters
        probe=lambda w: " ".join(f"--{k.replace('_', '-')} {config['probe'][k]}"
                                 for k in ("abs_threshold", "ratio_threshold", "n_seqs", "max_len")),
        runtime=runtime_args(),
    log:
        f"{RESULTS}/logs/probe_outliers/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/probe_outliers/{{model}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: config.get("runtime", {}).get("threads") or 1
    resources:
        gpu=gpu_count,
        mem_mb=mem_mb,
        runtime=runtime_min,
    shell:
        "python -m dlzo.probe --model {input.model} --out {output.json} --plot {output.png} "
        "{params.probe} {params.runtime} > {log} 2>&1"
