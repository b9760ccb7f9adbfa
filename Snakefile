# Weighted Multi-Token Prediction: config -> download -> refce/critic -> train -> eval -> report.
# Run the tiny default with `snakemake all` (profiles/default/ is loaded automatically);
# the paper setting with `snakemake all --configfile config/paper.yaml --profile profiles/slurm`.


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/refce.smk"
include: "rules/critic.smk"
include: "rules/train.smk"
include: "rules/eval.smk"
include: "rules/report.smk"


localrules:
    all,
    publish_report,


rule all:
    default_target: True
    input:
        get_final_outputs(),


onsuccess:
    print(f"Report: {REPORT_COPY} (also {report_path()})")
