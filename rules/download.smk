# Download (or, for the tiny default, build) the models and datasets the run needs.


rule download_model:
    output:
        directory(PATTERN.model("{role}")),
    log:
        "logs/{run}/download_model/{role}.log",
    benchmark:
        "logs/{run}/timings/download_model/{role}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        settings=get_model_params,
    script:
        "../workflow_scripts/download_model.py"


rule download_data:
    output:
        PATTERN.data("{dataset}", "{split}"),
    log:
        "logs/{run}/download_data/{dataset}/{split}.log",
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        settings=get_data_params,
    script:
        "../workflow_scripts/download_data.py"
