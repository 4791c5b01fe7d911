"""Sparse continual-learning methods (SparCL, DST, EsaCL).

Each module here registers its method(s) with :func:`sparsekern_cl.register_method` (and its
settings with :func:`sparsekern_cl.register_config_keys`) when imported; every module of this
package is imported with it, so a method is available to ``sparsekern_cl.run`` and the CLI as soon
as its file exists.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
