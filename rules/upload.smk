# Copy the run's final results (report, figures, evaluations, training and critic metrics) to
# storage.upload_prefix. A local rule: it runs on the submit host, which has the
# network access and credentials that compute nodes may lack.


rule upload_results:
    input:
        unpack(get_upload_inputs),
    output:
        PATTERN.upload_manifest(),
    log:
        "logs/{run}/upload_results.log",
    conda:
        "../envs/report.yaml"
    params:
        settings=get_upload_params,
    script:
        "../workflow_scripts/upload.py"
