# dlzo: Dominant-Layer zeroth-order fine-tuning, end to end.
#   download_model -> prepare_data -> probe_outliers (the dominant layer) -> probe_sensitivity, probe_gradnorm
#   (plot_probe, plot_sensitivity, plot_predictors: their figures)
#   -> zo_train (mezo-full, lora-zo, layer-<i> sweep, dominant, dominant-lora) -> evaluate (lm-eval)
#   -> tables (accuracy, speedup and paper tables; layer-sweep and loss figures)
# Run: snakemake --cores 2 --configfile workflow/configs/demo.yaml   (see README.md)
from snakemake.utils import min_version, validate

min_version("9.0")


# config.yaml is the paper's reproduction. A --configfile replaces it instead of being merged into
# it (Snakemake would otherwise deep-merge the two and the demo would inherit the paper's models);
# without one, config.yaml is read and --config's keys (e.g. results=/scratch/x) go on top of it.
if not workflow.config_settings.configfiles:

    configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


# The top of `snakemake --report results/report.html`; each result's caption is in workflow/report/.
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"


# Light or network-bound jobs stay on the submitting node under a cluster executor.
localrules:
    all,
    download_model,
    prepare_data,
    select_hyper,
    plot_probe,
    plot_sensitivity,
    plot_predictors,
    tables,


rule all:
    input:
        rules.tables.output,
        profile_outputs(),
    default_target: True
