# Stage 1 of critic-wmtp: a value head trained on the frozen base model's rollouts.


rule critic:
    input:
        unpack(get_critic_inputs),
    output:
        head="results/{run}/critic/value_head.safetensors",
        metrics="results/{run}/critic/metrics.json",
    log:
        "logs/{run}/critic/critic.log",
    benchmark:
        "logs/{run}/benchmarks/critic/critic.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=120,
    params:
        settings=get_critic_params,
    script:
        "../workflow_scripts/critic.py"
