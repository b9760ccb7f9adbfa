# Stage 1 of the methods with a critic (critic-wmtp), one critic per seed (its
# sampling and choice of problems are seeded by it): Monte-Carlo values of the
# training solutions' line boundaries on the frozen base model (K continuations
# each, executed in the sandbox), the gate that checks the table's per-line
# deltas against a fresh estimate, and the value table training reads.


rule critic:
    input:
        unpack(get_critic_inputs),
    output:
        table=PATTERN.critic_table("{seed}"),
        metrics=PATTERN.critic_metrics("{seed}"),
    log:
        "logs/{run}/critic/seed{seed}.log",
    benchmark:
        "logs/{run}/timings/critic/seed{seed}.tsv"
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
