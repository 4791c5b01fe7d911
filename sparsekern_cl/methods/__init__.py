"""Sparse continual-learning methods: SparCL (:mod:`.sparcl`), DST (:mod:`.dst`), EsaCL (:mod:`.esacl`).

Each module defines its plugins, its configuration group (a dataclass of its keys) and, for SparCL,
its presets; importing one registers nothing.  The methods are put together from these parts in
one table, :data:`sparsekern_cl.registry.METHODS`.  :mod:`.masking` holds the mask updates they share.
"""
