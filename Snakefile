# Weighted Multi-Token Prediction: config -> download -> refce/critic -> train -> eval -> report.
# Run the tiny default with `snakemake --cores all all` (profiles/default/ is loaded
# automatically); the paper setting on a Slurm cluster with `snakemake --profile slurm all`.


from wmtp.config.paths import DEFAULT_CONFIG


configfile: DEFAULT_CONFIG


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/reference.smk"
include: "rules/refce.smk"
include: "rules/critic.smk"
include: "rules/train.smk"
include: "rules/eval.smk"
include: "rules/report.smk"
include: "rules/upload.smk"


# Rules run by Snakemake itself, on the submit host, under any executor: the downloads
# (a cluster's compute nodes often have no internet, nor the user's Hugging Face token),
# the report copy and the upload (network, credentials).
localrules:
    all,
    download_model,
    download_data,
    publish_report,
    upload_results,


rule all:
    default_target: True
    input:
        get_final_outputs(),


onsuccess:
    print(f"Report: {REPORT_COPY} (also {LAYOUT.report()})")
