"""Test double: an install without the modules named in $COSYVOICED_TEST_MISSING_MODULES
(comma-separated), for every Python process started with this directory first on PYTHONPATH
(the daemon, its spawned workers, the --check-config probe).

A None entry in sys.modules is the import system's own way to block a module: `import name`
then raises ModuleNotFoundError from the importing line, as an uninstalled module would,
with no frame of this file in the traceback.
"""

import os
import sys

for _name in filter(None, os.environ.get("COSYVOICED_TEST_MISSING_MODULES", "").split(",")):
    sys.modules[_name] = None  # type: ignore[assignment]
