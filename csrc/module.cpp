// The Python module `shortcut_kernels._C`: importing it runs the static op
// registrations of every kernel file. It exports nothing itself (no pybind11).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
