"""Snakemake adapter of the upload_results rule: copy the run's final results to
storage.upload_prefix (wmtp.infra.storage.upload_results).

input:  report, figures (directory), evals, samples, metrics, critics: files under
        results/{run}/ (rules/common.smk::get_upload_inputs)
output: [0] results/{run}/upload.json, the manifest that was uploaded last as
        <prefix>/manifest.json (relpath -> sha256 of every uploaded file)
params: settings = {"prefix": s3://bucket/prefix, "endpoint_url": str | None}
Credentials come from the standard AWS variables or files (boto3).
"""

import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from wmtp.infra.atomic import write_json_atomic  # noqa: E402
from wmtp.infra.storage import upload_results  # noqa: E402

sm = snakemake  # noqa: F821
settings = sm.params.settings
run_dir = Path(sm.output[0]).parent
manifest = upload_results(
    run_dir,
    list(sm.input),
    settings["prefix"],
    endpoint_url=settings["endpoint_url"],
    info={"run": sm.wildcards.run, "prefix": settings["prefix"]},
)
write_json_atomic(sm.output[0], manifest)
print(f"uploaded {len(manifest['files'])} files to {settings['prefix']}", file=sys.stderr)
