# The paper table, training cost, weight statistics and figures of one run.


rule report:
    input:
        unpack(get_report_inputs),
    output:
        report=report(PATTERN.report(), category="Report"),
        table=report(PATTERN.table_csv(), category="Report"),
        figures=report(
            directory(PATTERN.figures()),
            patterns=["{name}.png"],
            category="Figures",
        ),
    log:
        "logs/{run}/report/report.log",
    conda:
        "../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        settings=get_report_params,
    script:
        "../workflow_scripts/report.py"


# results/report.md: a copy of the report of the configured run, the one file the
# README points to; each run keeps its own results/{run}/report.md (and figures/).
# `run` is a param, so switching configs re-copies even when the copy is newer.
rule publish_report:
    input:
        LAYOUT.report(),
    output:
        REPORT_COPY,
    log:
        f"logs/{RUN}/publish_report.log",
    conda:
        "../envs/report.yaml"
    params:
        run=RUN,
    shell:
        "cp {input} {output} 2> {log}"
