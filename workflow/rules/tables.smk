# The paper's tables and figures, and what `snakemake --report` shows (captions in workflow/report/).
rule tables:
    output:
        accuracy_md=L.tables("accuracy.md"),
        accuracy_csv=L.tables("accuracy.csv"),
        accuracy_tex=L.tables("accuracy.tex"),
        accuracy_html=tables_report("accuracy.html", "accuracy", "Accuracy", "Tables"),
        paper_md=L.tables("paper_comparison.md"),
        paper_csv=L.tables("paper_comparison.csv"),
        paper_html=tables_report("paper_comparison.html", "paper_comparison", "Accuracy", "Tables"),
        speedup_md=L.tables("speedup.md"),
        speedup_csv=L.tables("speedup.csv"),
        speedup_tex=L.tables("speedup.tex"),
        speedup_html=tables_report("speedup.html", "speedup", "Speed and memory"),
        figure=tables_report("layer_sweep.png", "layer_sweep", "Accuracy", "Figures"),
        loss=tables_report("loss_curves.png", "loss_curves", "Training"),
        memory=tables_report("memory_accuracy.png", "memory_accuracy", "Speed and memory"),
        provenance=L.tables("provenance.json"),
        selection_md=L.tables("hyper_selection.md"),
        selection_csv=L.tables("hyper_selection.csv"),
        ranking_md=L.tables("layer_ranking.md"),
        ranking_csv=L.tables("layer_ranking.csv"),
        correlations_csv=L.tables("layer_correlations.csv"),
        # the three layer predictors beside the sweep, per model (where the gradient norms are computed)
        **{f"predictors_{i}": tables_report(f"layer_predictors_{m}.png", "layer_predictors_sweep", "Probe")
           for i, m in enumerate(config["models"]) if gradnorm_enabled()},
    input:
        evals=eval_outputs(),
        logs=train_logs(),
        benchmarks=train_benchmarks(),
        selections=selections(),
        probes=[L.probe(m) for m in config["models"]],
        sensitivity=profile_outputs("sensitivity") if gradnorm_enabled() else [],
        gradnorm=profile_outputs("gradnorm"),
        meta=[L.data_meta(m, t) for m in config["models"] for t in config["tasks"]],
        paper="workflow/data/paper_reported.csv",
        code=code("tables"),
    params:
        paper_names=" ".join(f"{m}={v['paper_name']}" for m, v in config["models"].items() if v.get("paper_name")),
        protocol=report_protocol(),  # read by the report's captions
    log:
        L.log("tables"),
    benchmark:
        L.benchmark("tables")
    conda:
        "../../envs/tables.yaml"
    shell:
        "python -m dlzo.tables --evals {input.evals} --train-logs {input.logs} --probes {input.probes} "
        "--benchmarks {input.benchmarks} --selections {input.selections} --sensitivity {input.sensitivity} "
        "--gradnorm {input.gradnorm} --data-meta {input.meta} --paper {input.paper} "
        "--paper-name {params.paper_names} --out $(dirname {output.accuracy_md}) > {log} 2>&1"
