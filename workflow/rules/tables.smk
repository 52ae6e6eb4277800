# The paper's tables and figures, and what `snakemake --report` shows (captions in workflow/report/).
rule tables:
    output:
        accuracy_md=f"{RESULTS}/tables/accuracy.md",
        accuracy_csv=f"{RESULTS}/tables/accuracy.csv",
        accuracy_tex=f"{RESULTS}/tables/accuracy.tex",
        accuracy_html=tables_report("accuracy.html", "accuracy", "Accuracy", "Tables"),
        paper_md=f"{RESULTS}/tables/paper_comparison.md",
        paper_csv=f"{RESULTS}/tables/paper_comparison.csv",
        paper_html=tables_report("paper_comparison.html", "paper_comparison", "Accuracy", "Tables"),
        speedup_md=f"{RESULTS}/tables/speedup.md",
        speedup_csv=f"{RESULTS}/tables/speedup.csv",
        speedup_tex=f"{RESULTS}/tables/speedup.tex",
        speedup_html=tables_report("speedup.html", "speedup", "Speed and memory"),
        figure=tables_report("layer_sweep.png", "layer_sweep", "Accuracy", "Figures"),
        loss=tables_report("loss_curves.png", "loss_curves", "Training"),
        memory=tables_report("memory_accuracy.png", "memory_accuracy", "Speed and memory"),
        provenance=f"{RESULTS}/tables/provenance.json",
        selection_md=f"{RESULTS}/tables/hyper_selection.md",
        selection_csv=f"{RESULTS}/tables/hyper_selection.csv",
        ranking_md=f"{RESULTS}/tables/layer_ranking.md",
        ranking_csv=f"{RESULTS}/tables/layer_ranking.csv",
        correlations_csv=f"{RESULTS}/tables/layer_correlations.csv",
        # the three layer predictors beside the sweep, per model (where the gradient norms are computed)
        **{f"predictors_{i}": tables_report(f"layer_predictors_{m}.png", "layer_predictors_sweep", "Probe")
           for i, m in enumerate(config["models"]) if gradnorm_enabled()},
    input:
        evals=eval_outputs(),
        logs=train_logs(),
        benchmarks=train_benchmarks(),
        selections=selections(),
        probes=expand(f"{RESULTS}/probe/{{model}}/probe.json", model=config["models"]),
        sensitivity=[p for p in sensitivity_outputs() if p.endswith("sensitivity.json")] if gradnorm_enabled() else [],
        gradnorm=[p for p in sensitivity_outputs() if p.endswith("gradnorm.json")],
        meta=expand(f"{RESULTS}/data/{{task}}/meta.json", task=config["tasks"]),
        paper="workflow/data/paper_reported.csv",
        code=src("tables", "figures"),
    params:
        paper_names=" ".join(f"{m}={v['paper_name']}" for m, v in config["models"].items() if v.get("paper_name")),
        protocol=report_protocol(),  # read by the report's captions
    log:
        f"{RESULTS}/logs/tables.log",
    benchmark:
        f"{RESULTS}/benchmarks/tables.tsv"
    conda:
        "../../envs/tables.yaml"
    shell:
        "python -m dlzo.tables --evals {input.evals} --train-logs {input.logs} --probes {input.probes} "
        "--benchmarks {input.benchmarks} --selections {input.selections} --sensitivity {input.sensitivity} --gradnorm {input.gradnorm} --data-meta {input.meta} --paper {input.paper} "
        "--paper-name {params.paper_names} --out $(dirname {output.accuracy_md}) > {log} 2>&1"
