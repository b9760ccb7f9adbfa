# Download (or, for the tiny default, build) the models and datasets the run needs.


rule download_model:
    output:
        directory("results/{run}/models/{role}"),
    params:
        settings=get_model_params,
    log:
        "logs/{run}/download_model/{role}.log",
    benchmark:
        "logs/{run}/benchmarks/download_model/{role}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/download_model.py"


rule download_data:
    output:
        "results/{run}/data/{dataset}/{split}.parquet",
    params:
        settings=get_data_params,
    log:
        "logs/{run}/download_data/{dataset}/{split}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/download_data.py"
