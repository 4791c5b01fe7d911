"""sparsekern_cl: continual learning on real sparse compute, built on the public sparsekern API."""

__version__ = "0.1.0"
