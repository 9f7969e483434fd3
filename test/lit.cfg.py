# lit configuration: FileCheck tests of qcc passes (test/passes/*.mlir) and of
# the Python-level pipeline (test/lit/*.py).
import os
import sys

import lit.formats

config.name = "qcc"
config.test_format = lit.formats.ShTest(execute_external=False)
config.suffixes = [".mlir"]  # test/lit/lit.local.cfg adds .py there
config.test_source_root = os.path.dirname(__file__)
config.excludes = ["python", "data", "Output", "__pycache__"]
config.substitutions.append(("%PYTHON", sys.executable))
config.substitutions.append(("qcc-opt", f"{sys.executable} -m qcc.tools.qcc_opt"))
config.environment["PYTHONPATH"] = os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")
config.environment["PYTHONWARNINGS"] = "ignore"
