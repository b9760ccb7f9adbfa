#!/usr/bin/env bash
# Run by Snakemake inside the new conda env, from the workflow's working directory
# (the repository root): the workflow scripts import the wmtp package.
set -euo pipefail
pip install --no-deps --editable .
