import subprocess
import sys

import safetext.evaluation


def test_importing_the_package_loads_no_metric_backend():
    # a fresh interpreter, since other tests have long imported torch and NudeNet into this one
    code = (
        "import sys, safetext.evaluation; "
        "print(sorted(m for m in ('torch', 'nudenet', 'onnxruntime', 'numpy') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_public_names_resolve_lazily():
    for name in safetext.evaluation.__all__:
        assert getattr(safetext.evaluation, name) is not None
    assert safetext.evaluation.compute_fid.__module__ == "safetext.evaluation.fid"
    assert sorted(safetext.evaluation.__all__) == sorted(safetext.evaluation._EXPORTS)
