# weightpca: how much of a transformer's weights is really needed?
# One DAG of file artifacts; see README.md and docs/design.md.


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/factorize.smk"
include: "workflow/rules/surgery.smk"
include: "workflow/rules/compress.smk"
include: "workflow/rules/recovery.smk"
include: "workflow/rules/sketch.smk"
include: "workflow/rules/lowrank.smk"
include: "workflow/rules/report.smk"


# run where Snakemake runs, not as cluster jobs: downloads (compute nodes are
# often offline) and the target rule
localrules:
    all,
    fetch_corpus,
    fetch_gguf,


rule all:
    default_target: True
    input:
        all_outputs(),
