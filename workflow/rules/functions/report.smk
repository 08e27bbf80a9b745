"""Input functions and file lists of the report stage (workflow/rules/report.smk)."""


def benchmark_files():
    """Benchmark files of every job `all` runs before the report (the report's wall-time figure)."""
    return [
        *data_benchmarks(),
        *training_benchmarks(),
        *factorize_benchmarks(),
        *surgery_benchmarks(),
        *compress_files(rules.compress.benchmark),
        *onnx_files(rules.onnx.benchmark),
        *recovery_benchmarks(),
        *sketch_files(rules.sketch.benchmark),
        *lowrank_files(rules.train_lowrank.benchmark),
        *lowrank_files(rules.lowrank_sweep.benchmark),
    ]


def report_inputs(wildcards):
    """Tables of every enabled stage; a disabled stage is reported as not run."""
    inputs = {
        "runs": rules.train_summary.output.runs,
        "comparisons": rules.train_summary.output.comparisons,
        "spectrum": rules.spectrum.output[0],
        "params": rules.param_table.output[0],
        "metrics": run_metrics(),
        "benchmarks": benchmark_files(),
    }
    if SKETCH["enabled"]:
        inputs["sketch"] = sketch_files(rules.sketch.output.errors)
    if LOWRANK["enabled"]:
        inputs["lowrank"] = lowrank_files(rules.lowrank_sweep.output.sweep)
    if SURGERY["enabled"]:
        inputs["surgery"] = surgery_files(rules.surgery.output.table)
        inputs["frontier"] = expand(
            rules.surgery_frontier.output[0], target=list(SURGERY["targets"])
        )
        inputs["sensitivity"] = sensitivity_files()
        inputs["whole_model"] = expand(
            rules.surgery_whole_model.output.table,
            target=whole_model_targets(),
            mode=SURGERY["whole_model"]["modes"],
        )
        inputs["whole_model_frontier"] = expand(
            rules.surgery_whole_model_frontier.output[0], target=whole_model_targets()
        )
    if COMPRESS["enabled"]:
        inputs["compress"] = compress_files(rules.compress.output.record)
        inputs["onnx"] = onnx_files(rules.onnx.output.record)
    if recovery_points():
        inputs["recovery"] = recovery_outputs()
    return inputs


def all_outputs():
    return [
        rules.extract_baseline.output.manifest,
        *surgery_outputs(),
        *compress_files(rules.compress.output.record),
        *onnx_files(rules.onnx.output.record),
        *recovery_outputs(),
        *sketch_files(rules.sketch.output.errors),
        *lowrank_files(rules.lowrank_sweep.output.sweep),
        rules.report.output.summary_md,
    ]
