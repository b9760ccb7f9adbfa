# Stage 1 of critic-wmtp, one critic per seed (its rollouts, hold-out, selection and
# value head are seeded by it): a value head fitted on the frozen base model's
# rollouts, its held-out explained variance, and the value table training reads.


rule critic:
    input:
        unpack(get_critic_inputs),
    output:
        table="results/{run}/critic/seed{seed}/values.parquet",
        head="results/{run}/critic/seed{seed}/value_head.safetensors",
        metrics="results/{run}/critic/seed{seed}/metrics.json",
    log:
        "logs/{run}/critic/seed{seed}.log",
    benchmark:
        "logs/{run}/benchmarks/critic/seed{seed}.tsv"
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
