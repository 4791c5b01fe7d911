// The Python module `sparsekern._C`.  It holds no functions: importing it loads this library,
// whose static initialisers register the ops under torch.ops.sparsekern (see schemas.cpp).
#include <Python.h>

static struct PyModuleDef sparsekern_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "sparsekern C++ kernels; the ops are registered as torch.ops.sparsekern.*", -1,
    nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sparsekern_c_module); }
