rule evaluate:
    output:
        L.eval("{model}", "{task}", "{method}", "{seed}"),
    wildcard_constraints:
        method="[^/@]+",
    input:
        model=rules.download_model.output,
        test=rules.prepare_data.output.test,
        runs=lambda w: [run.log for run in result_runs(w)],
        # a grid method's first seed: the run is the grid point the selection chose (read when the job runs)
        selection=result_selection,
        code=code("evaluate"),
    params:
        run=lambda w, input: cli(selection=input.selection[0]) if input.selection
        else cli(run=str(Path(input.runs[0]).parent)),
        batch_size=config["evaluate"]["batch_size"],
        max_len=config["train"]["max_len"],  # truncated as in training (MeZO's rule)
        runtime=runtime_args,
    log:
        L.log("evaluate", "{model}/{task}/{method}/seed{seed}"),
    benchmark:
        L.benchmark("evaluate", "{model}/{task}/{method}/seed{seed}")
    conda:
        "../../envs/evaluate.yaml"
    threads: THREADS
    resources:
        **gpu_resources("evaluate"),
    shell:
        "python -m dlzo.evaluate --model {input.model} --data $(dirname {input.test}) --task {wildcards.task} "
        "{params.run} --method {wildcards.method} --seed {wildcards.seed} "
        "--tasks-dir $(dirname {output})/lm_eval_tasks/{wildcards.method}-seed{wildcards.seed} "
        "--batch-size {params.batch_size} --max-len {params.max_len} {params.runtime} --out {output} > {log} 2>&1"


rule evaluate_zero_shot:
    output:
        L.eval("{model}", "{task}", "zero-shot"),
    input:
        model=rules.download_model.output,
        test=rules.prepare_data.output.test,
        code=code("evaluate"),
    params:
        batch_size=config["evaluate"]["batch_size"],
        max_len=config["train"]["max_len"],  # truncated as in training (MeZO's rule)
        runtime=runtime_args,
    log:
        L.log("evaluate", "{model}/{task}/zero-shot"),
    benchmark:
        L.benchmark("evaluate", "{model}/{task}/zero-shot")
    conda:
        "../../envs/evaluate.yaml"
    threads: THREADS
    resources:
        **gpu_resources("evaluate_zero_shot"),
    shell:
        "python -m dlzo.evaluate --model {input.model} --data $(dirname {input.test}) --task {wildcards.task} "
        "--method zero-shot --tasks-dir $(dirname {output})/lm_eval_tasks/zero-shot "
        "--batch-size {params.batch_size} --max-len {params.max_len} {params.runtime} --out {output} > {log} 2>&1"


# The bias-only baseline of every multiple-choice task: the frozen model's candidate scores plus one
# offset per candidate, fitted on train (for each L2 strength) and the strength chosen on dev accuracy.
rule evaluate_calibrated:
    output:
        L.eval("{model}", "{task}", "calibrated-zero-shot"),
    input:
        model=rules.download_model.output,
        train=rules.prepare_data.output.train,
        dev=rules.prepare_data.output.dev,
        test=rules.prepare_data.output.test,
        code=code("evaluate"),
    params:
        batch_size=config["evaluate"]["batch_size"],
        max_len=config["train"]["max_len"],  # truncated as in training (MeZO's rule)
        l2=" ".join(str(x) for x in config["evaluate"].get("calibration_l2", [0.0, 0.01, 0.1, 1.0])),
        runtime=runtime_args,
    log:
        L.log("evaluate", "{model}/{task}/calibrated-zero-shot"),
    benchmark:
        L.benchmark("evaluate", "{model}/{task}/calibrated-zero-shot")
    conda:
        "../../envs/evaluate.yaml"
    threads: THREADS
    resources:
        **gpu_resources("evaluate_calibrated"),
    shell:
        "python -m dlzo.evaluate --model {input.model} --data $(dirname {input.test}) --task {wildcards.task} "
        "--method calibrated-zero-shot --calibrate --calibration-l2 {params.l2} "
        "--tasks-dir $(dirname {output})/lm_eval_tasks/calibrated-zero-shot "
        "--batch-size {params.batch_size} --max-len {params.max_len} {params.runtime} --out {output} > {log} 2>&1"
