# Stage 1 of critic-wmtp: a value head trained on the frozen base model's rollouts.


rule critic:
    input:
        unpack(get_critic_inputs),
    output:
        head="results/{run}/critic/value_head.safetensors",
        metrics="results/{run}/critic/metrics.json",
    params:
        settings=get_critic_params,
    log:
        "logs/{run}/critic/critic.log",
    benchmark:
        "logs/{run}/benchmarks/critic/critic.tsv"
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=120,
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/critic.py"
