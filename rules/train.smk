# Weighted multi-token-prediction fine-tuning: one job per (algorithm, seed).
# On the CPU default one process with `threads` torch threads; with resources.gpu > 1
# (profiles/slurm) the adapter re-executes itself under torchrun, one process per GPU
# (wmtp.cli.relaunch_distributed). The recipe is a param: editing it reruns this job.


rule train:
    input:
        unpack(get_train_inputs),
    output:
        model=directory(PATTERN.trained_model("{algo}", "{seed}")),
        metrics=PATTERN.train_metrics("{algo}", "{seed}"),
    log:
        "logs/{run}/train/{algo}/seed{seed}.log",
    benchmark:
        "logs/{run}/timings/train/{algo}/seed{seed}.tsv"
    wildcard_constraints:
        algo=trained_alternatives(),
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=240,
    params:
        algorithm="{algo}",
        recipe=get_recipe_params,
        settings=get_train_params,
    script:
        "../workflow_scripts/train.py"
