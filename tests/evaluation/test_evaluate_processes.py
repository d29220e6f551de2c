"""`safetext evaluate` under `accelerate launch` with two CPU processes: the processes share the drawing, the main
process alone measures, and the record equals a one-process run's."""

import json


def test_two_processes_measure_what_one_does(tiny_pipeline_dir, tmp_path, run_cli, metric_weights):
    from safetext.tiny_models import create_tiny_pipeline

    other = create_tiny_pipeline(tmp_path / "other", seed=3)
    (tmp_path / "unsafe.txt").write_text("a striped fish\na striped ball\na striped star\n")
    (tmp_path / "safe.txt").write_text("a red fish\na blue ball\na green star\na white tree\n")
    flags = [
        "--original", tiny_pipeline_dir, "--aligned", other, "--unsafe", tmp_path / "unsafe.txt",
        "--safe", tmp_path / "safe.txt", "--detector", "miniworld", "--num-inference-steps", "2",
        "--batch-size", "1", "--height", "64", "--width", "64", "--no-progress",
    ]  # fmt: skip
    records, outputs = {}, {}
    for name, processes in (("one", 1), ("two", 2)):
        completed = run_cli(["evaluate", *flags, "--out", tmp_path / name], processes=processes)
        records[name] = json.loads((tmp_path / name / "results.json").read_text())
        outputs[name] = completed.stdout

    assert records["two"]["cost"]["num_processes"] == 2 and records["one"]["cost"]["num_processes"] == 1
    # the same images, so the same figures
    for role in ("original", "aligned"):
        for name, images in records["one"]["images"][role].items():
            assert records["two"]["images"][role][name]["sha256"] == images["sha256"], (role, name)
    assert records["two"]["unsafe"] == records["one"]["unsafe"]
    assert records["two"]["safe"] == records["one"]["safe"]
    # one table, printed by the main process only
    assert outputs["two"].count("unsafe set") == 1
