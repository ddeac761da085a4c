// Python bindings of the MSDeformAttn kernels: input checks, then CPU or CUDA by value's device.
#include "ms_deform_attn.h"

#include <torch/extension.h>

namespace dino_msda {
namespace {

at::ScalarType accumulation_type(at::ScalarType value_type) {
  return value_type == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [N, S, M, D], got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2], got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, "ms_deform_attn: attention_weights must be [N, Lq, M, L, P], got ",
              attention_weights.sizes());
  const int64_t num_levels = sampling_locations.size(3);
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == num_levels && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be [L, 2] with L=", num_levels, ", got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == num_levels,
              "ms_deform_attn: level_start_index must be [L] with L=", num_levels, ", got ", level_start_index.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(sampling_locations.size(0) == value.size(0) && sampling_locations.size(2) == value.size(2),
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(), " does not match value ",
              value.sizes(), " in batch or heads");
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights ", attention_weights.sizes(), " does not match sampling_locations ",
              sampling_locations.sizes());
  const auto acc = accumulation_type(value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == acc && attention_weights.scalar_type() == acc,
              "ms_deform_attn: sampling_locations and attention_weights must be ", acc, " for ",
              value.scalar_type(), " values (the Python wrapper casts them)");
  TORCH_CHECK(sampling_locations.device() == value.device() && attention_weights.device() == value.device(),
              "ms_deform_attn: value, sampling_locations and attention_weights must be on one device");
}

at::Tensor forward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  if (value.is_cuda()) {
#ifdef DINO_WITH_CUDA
    return forward_cuda(value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
                        sampling_locations.contiguous(), attention_weights.contiguous());
#else
    TORCH_CHECK(false, "ms_deform_attn: this build of dino_core._C has no CUDA kernels");
#endif
  }
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn: unsupported device ", value.device());
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
              "ms_deform_attn: the CPU kernel supports float32 and float64, got ", value.scalar_type());
  return forward_cpu(value.contiguous(), spatial_shapes, level_start_index, sampling_locations.contiguous(),
                     attention_weights.contiguous());
}

std::vector<at::Tensor> backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == value.size(0) &&
                  grad_output.size(1) == sampling_locations.size(1) &&
                  grad_output.size(2) == value.size(2) * value.size(3),
              "ms_deform_attn: grad_output must be [N, Lq, M*D], got ", grad_output.sizes());
  const auto grad = grad_output.to(value.scalar_type()).contiguous();
  if (value.is_cuda()) {
#ifdef DINO_WITH_CUDA
    return backward_cuda(value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
                         sampling_locations.contiguous(), attention_weights.contiguous(), grad);
#else
    TORCH_CHECK(false, "ms_deform_attn: this build of dino_core._C has no CUDA kernels");
#endif
  }
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
              "ms_deform_attn: the CPU kernel supports float32 and float64, got ", value.scalar_type());
  return backward_cpu(value.contiguous(), spatial_shapes, level_start_index, sampling_locations.contiguous(),
                      attention_weights.contiguous(), grad);
}

}  // namespace
}  // namespace dino_msda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "MSDeformAttn kernels of dino_core (see csrc/ms_deform_attn.h for shapes)";
  m.def("forward", &dino_msda::forward, "MSDeformAttn forward -> [N, Lq, M*D]");
  m.def("backward", &dino_msda::backward,
        "MSDeformAttn backward -> (grad_value, grad_sampling_locations, grad_attention_weights)");
#ifdef DINO_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
