// The one library definition of the `cqdino` op namespace, and the Python module `cqdino._C`.
// Each op folder adds its schemas with TORCH_LIBRARY_FRAGMENT(cqdino, m) in its own files.
#include <torch/extension.h>

#include <string>

TORCH_LIBRARY(cqdino, m) {
  m.def("_has_cuda() -> bool", []() {
#ifdef WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}

namespace {

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cuda_arch_list() {
#ifdef CQDINO_CUDA_ARCH_LIST
  return CQDINO_CUDA_ARCH_LIST;
#else
  return "";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cqdino compiled ops; the ops themselves are reached as torch.ops.cqdino.*";
  m.def("has_cuda", &has_cuda, "Whether the CUDA kernels were compiled in.");
  m.def("cuda_arch_list", &cuda_arch_list, "TORCH_CUDA_ARCH_LIST the CUDA code was built for.");
}
