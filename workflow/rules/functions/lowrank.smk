"""Input functions and file lists of the lowrank stage (workflow/rules/lowrank.smk)."""

# λ as its label in paths (weightpca.runs.lambda_label) -> λ as configured;
# jobs look their λ up here rather than parsing it back from the path
LAMBDAS = {runs.lambda_label(lam): lam for lam in LOWRANK["lambdas"]}


def lowrank_files(pattern):
    """``pattern`` (an output or benchmark of the λ sweep's rules) for every λ and seed."""
    if not LOWRANK["enabled"]:
        return []
    return expand(pattern, lam=list(LAMBDAS), seed=LOWRANK["seeds"])
