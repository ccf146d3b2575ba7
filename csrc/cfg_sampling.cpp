// pairuni op library: schemas (TORCH_LIBRARY) and CPU kernels.
// The Python module `pairuni_kernels._C` exists only so that `import` loads this library.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pairuni, m) {}

static struct PyModuleDef pairuni_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pairuni_c_module); }
