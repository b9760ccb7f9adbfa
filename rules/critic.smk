# Stage 1 of the methods with a critic (critic-wmtp), one critic per seed (its
# rollouts, hold-out, selection and value head are seeded by it): a value head fitted
# on the frozen base model's rollouts, its held-out explained variance, and the value
# table training reads.


rule critic:
    input:
        unpack(get_critic_inputs),
    output:
        table=PATTERN.critic_table("{seed}"),
        head=PATTERN.critic_head("{seed}"),
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
