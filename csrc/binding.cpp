// Python binding of the CUDA kernels (module spectral_kernels._cuda).
//
// Takes the canonical 4-D layout (spectral_kernels/ops/_layout.py), validates it with
// errors that name the argument, allocates the fp32 outputs and calls the plain-CUDA
// launchers of launchers.h on the current stream, checking the CUDA error after each.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>

#include "launchers.h"

namespace sk = spectral_kernels;

namespace {

sk::ElementType element_type(const at::Tensor& t, const char* name) {
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16, got ", c10::toString(st));
  if (st == at::kHalf) return sk::ElementType::kFloat16;
  if (st == at::kBFloat16) return sk::ElementType::kBFloat16;
  return sk::ElementType::kFloat32;
}

void check_cuda_contiguous(const at::Tensor& t, const char* name, int64_t dim, const at::Device& device) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), " but q is on ", device);
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
                    " must start at a 16-byte aligned address (the kernels copy 16-byte vectors)");
}

// Input errors raise ValueError (shapes, devices, layout) or TypeError (dtypes).
// q (G, H, N, d), k (G, H, M, d), same dtype; returns the kernel shape (width unset).
sk::ProductShape check_qk(const at::Tensor& q, const at::Tensor& k) {
  const auto dtype = element_type(q, "q");
  check_cuda_contiguous(q, "q", 4, q.device());
  check_cuda_contiguous(k, "k", 4, q.device());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "k must have q's dtype ", q.scalar_type(), ", got ",
              k.scalar_type());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "k must have shape (G, H, M, d) matching q ", q.sizes(), ", got ", k.sizes());
  const int64_t d = q.size(3);
  TORCH_CHECK_VALUE(d >= 1 && d <= sk::kMaxHeadDim, "q and k feature dimension d must be in [1, ", sk::kMaxHeadDim,
              "], got ", d);
  TORCH_CHECK_VALUE(dtype == sk::ElementType::kFloat32 || d % 8 == 0,
              "16-bit q and k need d to be a multiple of 8 (pad with zeros), got d = ", d);
  TORCH_CHECK_VALUE(q.size(2) >= 1 && k.size(2) >= 1, "q and k need at least one token, got N = ", q.size(2),
              " and M = ", k.size(2));
  TORCH_CHECK_VALUE(q.size(0) * q.size(1) <= 65535, "q and k batch G·H must be ≤ 65535, got ", q.size(0) * q.size(1));
  TORCH_CHECK_VALUE(q.size(2) < (int64_t{1} << 31) && k.size(2) < (int64_t{1} << 31), "too many tokens for int32 indexing");
  sk::ProductShape shape;
  shape.groups = static_cast<int>(q.size(0));
  shape.heads = static_cast<int>(q.size(1));
  shape.n = static_cast<int>(q.size(2));
  shape.m_keys = static_cast<int>(k.size(2));
  shape.d = static_cast<int>(d);
  return shape;
}

// x (G, 1 or H, M, width) with q's dtype; fills width and x_heads.
void check_x(const at::Tensor& x, const at::Tensor& q, sk::ProductShape& shape) {
  check_cuda_contiguous(x, "x", 4, q.device());
  TORCH_CHECK_TYPE(x.scalar_type() == q.scalar_type(), "x must have q's dtype ", q.scalar_type(), ", got ",
              x.scalar_type());
  TORCH_CHECK_VALUE(x.size(0) == shape.groups && (x.size(1) == 1 || x.size(1) == shape.heads) &&
                  x.size(2) == shape.m_keys,
              "x must have shape (G, 1 or H, M, m) = (", shape.groups, ", 1 or ", shape.heads, ", ", shape.m_keys,
              ", m), got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(3) >= 1, "x needs at least one column");
  TORCH_CHECK_VALUE(q.scalar_type() == at::kFloat || x.size(3) % 8 == 0,
              "16-bit x needs a width that is a multiple of 8 (pad with zeros), got ", x.size(3));
  shape.width = static_cast<int>(x.size(3));
  shape.x_heads = static_cast<int>(x.size(1));
}

const float* offset_ptr(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& q, int64_t length) {
  if (!t.has_value()) return nullptr;
  check_cuda_contiguous(*t, name, 3, q.device());
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->size(0) == q.size(0) && t->size(1) == q.size(1) && t->size(2) == length, name,
              " must have shape (", q.size(0), ", ", q.size(1), ", ", length, "), got ", t->sizes());
  return t->data_ptr<float>();
}

const float* weights_ptr(const std::optional<at::Tensor>& w, const at::Tensor& q) {
  if (!w.has_value()) return nullptr;
  check_cuda_contiguous(*w, "head_weights", 1, q.device());
  TORCH_CHECK_TYPE(w->scalar_type() == at::kFloat, "head_weights must be float32, got ", w->scalar_type());
  TORCH_CHECK_VALUE(w->size(0) == q.size(1), "head_weights must have one weight per head (", q.size(1), "), got ",
              w->sizes());
  return w->data_ptr<float>();
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " kernel launch failed: ", cudaGetErrorString(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor output_tensor(const at::Tensor& q, const sk::ProductShape& shape, bool summed_heads) {
  const auto options = q.options().dtype(at::kFloat);
  if (summed_heads) return at::zeros({shape.groups, shape.n, shape.width}, options);
  return at::empty({shape.groups, shape.heads, shape.n, shape.width}, options);
}

std::vector<at::Tensor> affinity_matmul(const at::Tensor& q, const at::Tensor& k, const at::Tensor& x,
                                        const std::optional<at::Tensor>& row_offset,
                                        const std::optional<at::Tensor>& col_offset,
                                        const std::optional<at::Tensor>& head_weights, double scale,
                                        bool normalize) {
  sk::ProductShape shape = check_qk(q, k);
  check_x(x, q, shape);
  const c10::cuda::CUDAGuard guard(q.device());
  const float* alpha = offset_ptr(row_offset, "row_offset", q, shape.n);
  const float* beta = offset_ptr(col_offset, "col_offset", q, shape.m_keys);
  sk::ProductOutput output;
  output.head_weights = weights_ptr(head_weights, q);
  at::Tensor y = output_tensor(q, shape, output.head_weights != nullptr);
  at::Tensor lse = normalize ? at::empty({shape.groups, shape.heads, shape.n}, q.options().dtype(at::kFloat))
                             : at::empty({0}, q.options().dtype(at::kFloat));
  output.out = y.data_ptr<float>();
  output.lse = normalize ? lse.data_ptr<float>() : nullptr;
  output.accumulate = output.head_weights != nullptr;
  check_launch(sk::launch_affinity_rows(element_type(q, "q"), q.data_ptr(), k.data_ptr(), x.data_ptr(), alpha,
                                        beta, shape, static_cast<float>(scale), normalize, output,
                                        c10::cuda::getCurrentCUDAStream()),
               "affinity_matmul");
  return {y, lse};
}

at::Tensor affinity_logsumexp(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& col_offset,
                              double scale) {
  sk::ProductShape shape = check_qk(q, k);
  const c10::cuda::CUDAGuard guard(q.device());
  const float* beta = offset_ptr(col_offset, "col_offset", q, shape.m_keys);
  at::Tensor lse = at::empty({shape.groups, shape.heads, shape.n}, q.options().dtype(at::kFloat));
  check_launch(sk::launch_affinity_logsumexp(element_type(q, "q"), q.data_ptr(), k.data_ptr(), beta, shape,
                                             static_cast<float>(scale), lse.data_ptr<float>(),
                                             c10::cuda::getCurrentCUDAStream()),
               "affinity_logsumexp");
  return lse;
}

at::Tensor affinity_symmetric_matmul(const at::Tensor& q, const at::Tensor& k, const at::Tensor& x,
                                     const std::optional<at::Tensor>& offset,
                                     const std::optional<at::Tensor>& head_weights, double scale, bool same_tensor) {
  sk::ProductShape shape = check_qk(q, k);
  TORCH_CHECK_VALUE(shape.n == shape.m_keys, "the symmetric product needs q and k with the same number of tokens, got ",
              shape.n, " and ", shape.m_keys);
  TORCH_CHECK_VALUE(!same_tensor || q.data_ptr() == k.data_ptr(), "same_tensor=True but q and k are different arrays");
  check_x(x, q, shape);
  const c10::cuda::CUDAGuard guard(q.device());
  const float* a = offset_ptr(offset, "offset", q, shape.n);
  sk::ProductOutput output;
  output.head_weights = weights_ptr(head_weights, q);
  at::Tensor y = at::zeros(output.head_weights ? std::vector<int64_t>{shape.groups, shape.n, shape.width}
                                               : std::vector<int64_t>{shape.groups, shape.heads, shape.n, shape.width},
                           q.options().dtype(at::kFloat));
  output.out = y.data_ptr<float>();
  output.accumulate = true;
  check_launch(sk::launch_affinity_symmetric(element_type(q, "q"), q.data_ptr(), k.data_ptr(), x.data_ptr(), a,
                                             shape, static_cast<float>(scale), same_tensor, output,
                                             c10::cuda::getCurrentCUDAStream()),
               "affinity_symmetric_matmul");
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels of spectral_kernels (canonical 4-D layout; see spectral_kernels/ops/_layout.py)";
  m.def("affinity_matmul", &affinity_matmul, "(y, lse) = exp-affinity row product; lse empty unless normalize",
        py::arg("q"), py::arg("k"), py::arg("x"), py::arg("row_offset"), py::arg("col_offset"),
        py::arg("head_weights"), py::arg("scale"), py::arg("normalize"));
  m.def("affinity_logsumexp", &affinity_logsumexp, "row log-sum-exp of τ·q·kᵀ − β", py::arg("q"), py::arg("k"),
        py::arg("col_offset"), py::arg("scale"));
  m.def("affinity_symmetric_matmul", &affinity_symmetric_matmul, "½(E + Eᵀ)·X in one pass", py::arg("q"),
        py::arg("k"), py::arg("x"), py::arg("offset"), py::arg("head_weights"), py::arg("scale"),
        py::arg("same_tensor"));
  m.attr("MAX_HEAD_DIM") = sk::kMaxHeadDim;
}
