"""Compiled and JIT kernels behind the ``cpp``, ``triton`` and ``cuda`` backends (imported lazily).

Names.  One stem per op through every layer: the op is ``linear``, ``conv2d`` (``dwconv2d`` for
the depthwise C++ ops), ``spmm`` or ``sddmm``; a pass is ``fwd`` (forward), ``dx`` (input
gradient) or ``dw`` (weight gradient on the gradient mask); a format is ``csr`` (unstructured) or
``bsr`` (block).  Backend methods, reference functions and C++ ops (``torch.ops.sparsekern.*``)
are ``{op}_{pass}`` (``linear_dw``, ``conv2d_dx``).  Triton launchers are
``{format}_{op}_{pass}`` (``bsr_linear_fwd``, ``csr_conv2d_dw``).  A ``@triton.jit`` kernel is
``_{format}_{product}[_{pass}]_kernel``, where the product is the library op it computes
(``spmm`` serves both linear ``fwd`` and ``dx``, ``sddmm`` is linear ``dw``) and the pass is
named only when the kernel serves one (``_bsr_spmm_kernel``, ``_csr_sddmm_kernel``,
``_bsr_conv2d_dx_kernel``); its helpers drop ``_kernel`` and add ``_tuned`` (the
:class:`~sparsekern.kernels.triton._launch.Tuned` handle), ``_configs`` (tuning space), ``_fit``
(clamp of a configuration to a call) or ``_launch`` (shared launch code).  Autograd Functions and
functional ops keep the bare op stem (``LinearFunction``, ``sparse_linear``, ``SddmmFunction``,
``sddmm``), and so do the :attr:`~sparsekern._backends.CallInfo.op` values the verifiers see.
"""
