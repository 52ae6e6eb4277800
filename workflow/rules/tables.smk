rule tables:
    output:
        accuracy_md=f"{RESULTS}/tables/accuracy.md",
        accuracy_csv=f"{RESULTS}/tables/accuracy.csv",
        speedup_md=f"{RESULTS}/tables/speedup.md",
        speedup_csv=f"{RESULTS}/tables/speedup.csv",
        figure=report(f"{RESULTS}/tables/layer_sweep.png", caption="../report/layer_sweep.rst",
                      category="Results"),
        provenance=f"{RESULTS}/tables/provenance.json",
    input:
        evals=eval_outputs(),
        logs=train_logs(),
        probes=expand(f"{RESULTS}/probe/{{model}}/probe.json", model=config["models"]),
        code=src("tables"),
    log:
        f"{RESULTS}/logs/tables.log",
    benchmark:
        f"{RESULTS}/benchmarks/tables.tsv"
    conda:
        "../../envs/tables.yaml"
    shell:
        "python -m dlzo.tables --evals {input.evals} --train-logs {input.logs} --probes {input.probes} "
        "--out $(dirname {output.accuracy_md}) "
        "> {log} 2>&1"
