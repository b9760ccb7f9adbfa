# Reference cross-entropy of every training token under the reference model (Rho-1).


rule refce:
    input:
        ref="results/{run}/models/ref",
        base="results/{run}/models/base",
        data="results/{run}/data/{dataset}/train.parquet",
    output:
        "results/{run}/refce/{dataset}.parquet",
    log:
        "logs/{run}/refce/{dataset}.log",
    benchmark:
        "logs/{run}/benchmarks/refce/{dataset}.tsv"
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
