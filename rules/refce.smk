# Reference cross-entropy of every training token under the reference model (Rho-1).


rule refce:
    input:
        unpack(get_refce_inputs),  # ref: the fine-tuned reference when reference_finetune is enabled
    output:
        PATTERN.refce("{dataset}"),
    log:
        "logs/{run}/refce/{dataset}.log",
    benchmark:
        "logs/{run}/timings/refce/{dataset}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=60,
    params:
        settings=get_refce_params,
    script:
        "../workflow_scripts/refce.py"
