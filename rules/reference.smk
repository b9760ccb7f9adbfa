# Optional (reference_finetune.enabled): the Rho-1 reference fine-tuned on a clean split
# in the fine-tuning prompt format before the refce stage scores with it. The training
# split is an input only to check that no problem of it is fine-tuned on.


rule finetune_reference:
    input:
        unpack(get_reference_inputs),
    output:
        directory(PATTERN.finetuned_ref()),
    log:
        "logs/{run}/finetune_reference.log",
    benchmark:
        "logs/{run}/timings/finetune_reference.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=120,
    params:
        settings=get_reference_params,
    script:
        "../workflow_scripts/finetune_reference.py"
