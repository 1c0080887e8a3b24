// The Python module `shortcut_kernels._C`. Importing it runs the static op registrations
// of every kernel file (schemas, CPU and CUDA kernels). It also exports each op as a
// plain function that calls it through a typed dispatcher handle looked up once: about
// 0.4 us per call from Python, against 1.4 us through torch.ops, which matches the
// arguments to the schema on every call. At UNet sizes that is a few % of a CPU kernel
// and a large share of a GPU one.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "cpu/cpu_features.h"

namespace {

namespace py = pybind11;

template <typename Signature>
struct DirectCall;

template <typename Ret, typename... Args>
struct DirectCall<Ret(Args...)> {
  static c10::TypedOperatorHandle<Ret(Args...)> handle(const char* name) {
    const std::string qualified = std::string("shortcut_kernels_ext::") + name;
    return c10::Dispatcher::singleton()
        .findSchemaOrThrow(qualified.c_str(), "")
        .template typed<Ret(Args...)>();
  }

  static void def(py::module_& m, const char* name) {
    auto op = handle(name);
    m.def(
        name, [op](Args... args) -> Ret { return op.call(std::forward<Args>(args)...); },
        py::call_guard<py::gil_scoped_release>());
  }
};

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "shortcut_kernels C++/CUDA kernels; the ops are also under torch.ops.shortcut_kernels_ext";
  DirectCall<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&)>::def(
      m, "gated_blend_forward");
  DirectCall<Tensor3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, bool,
                     bool)>::def(m, "gated_blend_backward");
  DirectCall<Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&)>::def(
      m, "gated_residual_forward");
  DirectCall<Tensor2(const Tensor&, const Tensor&, const OptTensor&, bool, bool)>::def(
      m, "gated_residual_backward");
  DirectCall<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                    const OptTensor&, const OptTensor&, double, double, double)>::def(
      m, "guided_step_forward");
  DirectCall<Tensor3(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double,
                     double, double, bool, bool, bool)>::def(m, "guided_step_backward");
  // Tensor[] is an ArrayRef, which pybind11 cannot build from a list: take a vector.
  auto cache_residual =
      DirectCall<Tensor(const Tensor&, at::TensorList, const OptTensor&)>::handle(
          "cache_residual_forward");
  m.def(
      "cache_residual_forward",
      [cache_residual](const Tensor& x, const std::vector<Tensor>& caches,
                       const OptTensor& weights) { return cache_residual.call(x, caches, weights); },
      py::arg("x"), py::arg("caches"), py::arg("weights") = py::none(),
      py::call_guard<py::gil_scoped_release>());
  m.def("cpu_info", [] {
    namespace cpu = shortcut_kernels::cpu;
    py::dict info;
    info["avx512f"] = cpu::has_avx512f();
    info["avx512bf16"] = cpu::use_avx512bf16();
    info["stream_min_bytes"] = cpu::stream_min_bytes();
    info["streamed_calls"] = cpu::streamed_calls().load();
    return info;
  }, "What the CPU kernels use: AVX-512 paths, the streaming-store threshold (bytes an op "
     "moves) and how many op calls streamed their outputs so far.");
}
