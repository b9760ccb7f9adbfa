# Sample solutions from one trained model and execute them against one benchmark's tests.


rule eval:
    input:
        unpack(get_eval_inputs),
    output:
        summary=PATTERN.eval_file("{algo}", "{seed}", "{benchmark}", "json"),
        samples=PATTERN.eval_file("{algo}", "{seed}", "{benchmark}", "jsonl"),
    log:
        "logs/{run}/eval/{algo}/seed{seed}/{benchmark}.log",
    benchmark:
        "logs/{run}/timings/eval/{algo}/seed{seed}/{benchmark}.tsv"
    conda:
        "../envs/eval.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=120,
    params:
        settings=get_eval_params,
    script:
        "../workflow_scripts/eval.py"
