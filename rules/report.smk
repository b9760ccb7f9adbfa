# The paper table, training cost, weight statistics and figures of one run.


rule report:
    input:
        unpack(get_report_inputs),
    output:
        report=report("results/{run}/report.md", category="Report"),
        figures=report(
            directory("results/{run}/figures"),
            patterns=["{name}.png"],
            category="Figures",
        ),
    params:
        settings=get_report_params,
    log:
        "logs/{run}/report/report.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/report.yaml"
    script:
        "../workflow_scripts/report.py"


rule publish_report:
    input:
        report_path(),
    output:
        REPORT_COPY,
    params:
        run=RUN,
    log:
        f"logs/{RUN}/publish_report.log",
    conda:
        "../envs/report.yaml"
    shell:
        "cp {input} {output} 2> {log}"
