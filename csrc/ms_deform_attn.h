// Multi-scale deformable attention kernels (forward and backward) for CPU and CUDA.
//
// Shapes (all tensors contiguous, checked in bindings.cpp):
//   value               [N, S, M, D]            S = sum_l H_l * W_l, M heads of D channels
//   spatial_shapes      [L, 2] int64            (H_l, W_l)
//   level_start_index   [L] int64               offset of level l in S
//   sampling_locations  [N, Lq, M, L, P, 2]     (x, y) in [0, 1] of the level's map
//   attention_weights   [N, Lq, M, L, P]
//   output              [N, Lq, M * D]
//
// Sampling follows grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False):
// pixel coordinates are loc * size - 0.5 and corners outside the map read zeros.
//
// Locations and weights use the accumulation type (float32 for half/bfloat16 values); the Python
// wrapper casts them before the call.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace dino_msda {

at::Tensor forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

// Returns {grad_value, grad_sampling_locations, grad_attention_weights}.
std::vector<at::Tensor> backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

#ifdef DINO_WITH_CUDA
at::Tensor forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

std::vector<at::Tensor> backward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);
#endif

}  // namespace dino_msda
