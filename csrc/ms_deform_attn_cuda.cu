// CUDA kernels for multi-scale deformable attention: float32, float16, bfloat16 (accumulated in
// float32) and float64 (for gradcheck).
//
// Work layout: a "group" of G threads (a power of two dividing the warp) owns one (batch, query,
// head). Each thread covers VEC consecutive channels with one 16-byte load per corner, so a
// group reads a corner's D channels as one coalesced row. Before touching values the group
// computes every sampling point's bilinear footprint once (lane i takes points i, i+G, ...) into
// shared memory; all lanes then reuse it across their channels.
//
// Forward: every output element has exactly one writer, so no atomics.
// Backward: grad_value is scattered with atomics (vector atomics on sm_90); the per-point
// gradients of locations and attention weights are reduced across the group with warp shuffles
// and written once by the group's first lane, so they need neither atomics nor zero-filling.
#include "ms_deform_attn.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

namespace dino_msda {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 256;
constexpr int kVectorBytes = 16;
constexpr size_t kMaxSharedBytes = 48 * 1024;

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// Shapes shared by both kernels.
struct Problem {
  int64_t num_groups;  // batch * queries * heads
  int64_t num_keys;
  int num_heads;
  int channels;
  int num_queries;
  int num_levels;
  int num_points;
  int group_size;      // G
  int log2_group;
};

// Footprint of one sampling point as stored in shared memory.
template <typename acc_t>
struct PointTable {
  int index[4];       // spatial index into S per corner, -1 outside the map
  acc_t weight[4];    // bilinear weight per corner (0 outside)
  acc_t fx, fy;       // fractional position inside the cell (backward only)
  acc_t attention;    // attention weight of the point
  int level;
};

template <typename acc_t>
__device__ __forceinline__ void compute_footprint(
    acc_t loc_x, acc_t loc_y, acc_t attention, int level, const int* level_height, const int* level_width,
    const int* level_start, int64_t num_keys, PointTable<acc_t>& entry) {
  const int height = level_height[level];
  const int width = level_width[level];
  // align_corners=False: pixel centres sit at (i + 0.5) / size.
  const acc_t x = loc_x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(height) - acc_t(0.5);
  entry.attention = attention;
  entry.level = level;
  entry.fx = acc_t(0);
  entry.fy = acc_t(0);
  for (int k = 0; k < 4; ++k) {
    entry.index[k] = -1;
    entry.weight[k] = acc_t(0);
  }
  // Also false for NaN locations.
  if (!(x >= acc_t(-1) && x < static_cast<acc_t>(width) && y >= acc_t(-1) && y < static_cast<acc_t>(height))) {
    return;
  }
  const acc_t x_floor = floor(x);
  const acc_t y_floor = floor(y);
  const int x0 = static_cast<int>(x_floor);
  const int y0 = static_cast<int>(y_floor);
  const acc_t fx = x - x_floor;
  const acc_t fy = y - y_floor;
  entry.fx = fx;
  entry.fy = fy;
  const acc_t corner_weight[4] = {(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy};
  const int start = level_start[level];
  for (int k = 0; k < 4; ++k) {
    const int xi = x0 + (k & 1);
    const int yi = y0 + (k >> 1);
    const int64_t index = static_cast<int64_t>(start) + static_cast<int64_t>(yi) * width + xi;
    // The key-range test keeps a malformed level_start_index from reading out of bounds.
    if (xi >= 0 && xi < width && yi >= 0 && yi < height && index >= 0 && index < num_keys) {
      entry.index[k] = static_cast<int>(index);
      entry.weight[k] = corner_weight[k];
    }
  }
}

// Block prologue shared by both kernels: level table into shared memory, then each group's
// point footprints. Returns the group's table.
template <typename acc_t>
__device__ __forceinline__ PointTable<acc_t>* prepare_tables(
    unsigned char* shared, const int64_t* __restrict__ spatial_shapes, const int64_t* __restrict__ level_start_index,
    const acc_t* __restrict__ locations, const acc_t* __restrict__ attention_weights, const Problem& pb,
    int64_t group, int lane, bool active) {
  const int points_per_group = pb.num_levels * pb.num_points;
  auto* tables = reinterpret_cast<PointTable<acc_t>*>(shared);
  const int groups_per_block = blockDim.x >> pb.log2_group;
  int* level_height = reinterpret_cast<int*>(tables + static_cast<size_t>(groups_per_block) * points_per_group);
  int* level_width = level_height + pb.num_levels;
  int* level_start = level_width + pb.num_levels;
  for (int l = threadIdx.x; l < pb.num_levels; l += blockDim.x) {
    level_height[l] = static_cast<int>(spatial_shapes[2 * l]);
    level_width[l] = static_cast<int>(spatial_shapes[2 * l + 1]);
    level_start[l] = static_cast<int>(level_start_index[l]);
  }
  __syncthreads();
  PointTable<acc_t>* table = tables + static_cast<size_t>(threadIdx.x >> pb.log2_group) * points_per_group;
  if (active) {
    const int64_t first_point = group * points_per_group;
    for (int pt = lane; pt < points_per_group; pt += pb.group_size) {
      const int64_t point = first_point + pt;
      compute_footprint<acc_t>(locations[2 * point], locations[2 * point + 1], attention_weights[point],
                               pt / pb.num_points, level_height, level_width, level_start, pb.num_keys,
                               table[pt]);
    }
  }
  // Groups never straddle a warp, so a warp barrier publishes the table to the whole group.
  __syncwarp();
  return table;
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads) forward_kernel(
    const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index, const acc_t* __restrict__ locations,
    const acc_t* __restrict__ attention_weights, scalar_t* __restrict__ output, Problem pb) {
  extern __shared__ __align__(16) unsigned char shared[];
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = thread >> pb.log2_group;
  const int lane = static_cast<int>(thread & (pb.group_size - 1));
  const bool active = group < pb.num_groups;
  const PointTable<acc_t>* table = prepare_tables<acc_t>(shared, spatial_shapes, level_start_index, locations,
                                                         attention_weights, pb, group, lane, active);
  if (!active) return;  // no warp-wide operations follow in the forward pass

  const int head = static_cast<int>(group % pb.num_heads);
  const int64_t batch = group / (static_cast<int64_t>(pb.num_queries) * pb.num_heads);
  const int64_t row_stride = static_cast<int64_t>(pb.num_heads) * pb.channels;
  const scalar_t* head_value = value + batch * pb.num_keys * row_stride + static_cast<int64_t>(head) * pb.channels;
  const int points_per_group = pb.num_levels * pb.num_points;

  for (int c0 = lane * VEC; c0 < pb.channels; c0 += pb.group_size * VEC) {
    acc_t acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
    for (int pt = 0; pt < points_per_group; ++pt) {
      const PointTable<acc_t>& entry = table[pt];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int index = entry.index[k];
        if (index < 0) continue;
        const acc_t w = entry.weight[k] * entry.attention;
        const Pack<scalar_t, VEC> v =
            *reinterpret_cast<const Pack<scalar_t, VEC>*>(head_value + index * row_stride + c0);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += w * static_cast<acc_t>(v.v[i]);
      }
    }
    Pack<scalar_t, VEC> out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) out.v[i] = static_cast<scalar_t>(acc[i]);
    *reinterpret_cast<Pack<scalar_t, VEC>*>(output + group * pb.channels + c0) = out;
  }
}

// grad_value accumulation: float32 buffers use vector atomics where the hardware has them (sm_90).
template <int VEC>
__device__ __forceinline__ void atomic_add_row(float* dst, const float* src) {
  static_assert(VEC == 1 || VEC % 2 == 0, "vector widths are 1 or even");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + i), make_float4(src[i], src[i + 1], src[i + 2], src[i + 3]));
    }
  } else if constexpr (VEC % 2 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 2) {
      atomicAdd(reinterpret_cast<float2*>(dst + i), make_float2(src[i], src[i + 1]));
    }
  } else {
    atomicAdd(dst, src[0]);
  }
#else
#pragma unroll
  for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, src[i]);
#endif
}

template <int VEC>
__device__ __forceinline__ void atomic_add_row(double* dst, const double* src) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, src[i]);
}

template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int group_size) {
  for (int offset = group_size >> 1; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// grad_value_acc is float32 for half/bfloat16 values (converted by the host afterwards).
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads) backward_kernel(
    const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index, const acc_t* __restrict__ locations,
    const acc_t* __restrict__ attention_weights, const scalar_t* __restrict__ grad_output,
    acc_t* __restrict__ grad_value_acc, acc_t* __restrict__ grad_locations, acc_t* __restrict__ grad_weights,
    Problem pb) {
  extern __shared__ __align__(16) unsigned char shared[];
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = thread >> pb.log2_group;
  const int lane = static_cast<int>(thread & (pb.group_size - 1));
  const bool active = group < pb.num_groups;
  const PointTable<acc_t>* table = prepare_tables<acc_t>(shared, spatial_shapes, level_start_index, locations,
                                                         attention_weights, pb, group, lane, active);
  // Inactive threads stay to take part in the group reductions, with zero contributions.
  const int* level_height = reinterpret_cast<const int*>(
      reinterpret_cast<const PointTable<acc_t>*>(shared) +
      static_cast<size_t>(blockDim.x >> pb.log2_group) * pb.num_levels * pb.num_points);
  const int* level_width = level_height + pb.num_levels;

  const int head = static_cast<int>(group % pb.num_heads);
  const int64_t batch = group / (static_cast<int64_t>(pb.num_queries) * pb.num_heads);
  const int64_t row_stride = static_cast<int64_t>(pb.num_heads) * pb.channels;
  const int64_t head_offset = batch * pb.num_keys * row_stride + static_cast<int64_t>(head) * pb.channels;
  const scalar_t* head_value = value + head_offset;
  acc_t* head_grad_value = grad_value_acc + head_offset;
  const int points_per_group = pb.num_levels * pb.num_points;

  for (int pt = 0; pt < points_per_group; ++pt) {
    acc_t d_weight = 0, d_x = 0, d_y = 0;
    if (active) {
      const PointTable<acc_t>& entry = table[pt];
      const acc_t fx = entry.fx, fy = entry.fy;
      for (int c0 = lane * VEC; c0 < pb.channels; c0 += pb.group_size * VEC) {
        const Pack<scalar_t, VEC> go = *reinterpret_cast<const Pack<scalar_t, VEC>*>(grad_output + group * pb.channels + c0);
        acc_t g[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) g[i] = static_cast<acc_t>(go.v[i]);
        acc_t corner[4][VEC];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int index = entry.index[k];
          if (index >= 0) {
            const Pack<scalar_t, VEC> v =
                *reinterpret_cast<const Pack<scalar_t, VEC>*>(head_value + index * row_stride + c0);
            acc_t scaled[VEC];
            const acc_t w = entry.weight[k] * entry.attention;
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              corner[k][i] = static_cast<acc_t>(v.v[i]);
              scaled[i] = w * g[i];
            }
            atomic_add_row<VEC>(head_grad_value + index * row_stride + c0, scaled);
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) corner[k][i] = acc_t(0);
          }
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const acc_t sampled = entry.weight[0] * corner[0][i] + entry.weight[1] * corner[1][i] +
                                entry.weight[2] * corner[2][i] + entry.weight[3] * corner[3][i];
          d_weight += g[i] * sampled;
          d_x += g[i] * ((corner[1][i] - corner[0][i]) * (1 - fy) + (corner[3][i] - corner[2][i]) * fy);
          d_y += g[i] * ((corner[2][i] - corner[0][i]) * (1 - fx) + (corner[3][i] - corner[1][i]) * fx);
        }
      }
    }
    d_weight = group_sum(d_weight, pb.group_size);
    d_x = group_sum(d_x, pb.group_size);
    d_y = group_sum(d_y, pb.group_size);
    if (active && lane == 0) {
      const PointTable<acc_t>& entry = table[pt];
      const int64_t point = group * points_per_group + pt;
      grad_weights[point] = d_weight;
      grad_locations[2 * point] = entry.attention * static_cast<acc_t>(level_width[entry.level]) * d_x;
      grad_locations[2 * point + 1] = entry.attention * static_cast<acc_t>(level_height[entry.level]) * d_y;
    }
  }
}

struct LaunchShape {
  Problem problem;
  int threads;
  int64_t blocks;
  size_t shared_bytes;
};

template <typename acc_t>
LaunchShape plan_launch(const at::Tensor& value, const at::Tensor& sampling_locations, int vec) {
  Problem pb;
  pb.num_keys = value.size(1);
  pb.num_heads = static_cast<int>(value.size(2));
  pb.channels = static_cast<int>(value.size(3));
  pb.num_queries = static_cast<int>(sampling_locations.size(1));
  pb.num_levels = static_cast<int>(sampling_locations.size(3));
  pb.num_points = static_cast<int>(sampling_locations.size(4));
  pb.num_groups = value.size(0) * sampling_locations.size(1) * value.size(2);
  TORCH_CHECK(pb.num_keys < (int64_t{1} << 31), "ms_deform_attn: S=", pb.num_keys, " exceeds the CUDA kernel's int32 key index");
  // Smallest power-of-two group whose lanes cover the channels with one vector each (at most a warp).
  const int lanes_needed = (pb.channels + vec - 1) / vec;
  pb.group_size = 1;
  pb.log2_group = 0;
  while (pb.group_size < lanes_needed && pb.group_size < kWarp) {
    pb.group_size <<= 1;
    ++pb.log2_group;
  }
  const size_t table_bytes = sizeof(PointTable<acc_t>) * pb.num_levels * pb.num_points;
  const size_t level_bytes = 3 * sizeof(int) * pb.num_levels;
  int threads = kMaxThreads;
  while (threads > kWarp && (threads / pb.group_size) * table_bytes + level_bytes > kMaxSharedBytes) threads >>= 1;
  const size_t shared_bytes = (threads / pb.group_size) * table_bytes + level_bytes;
  TORCH_CHECK(shared_bytes <= kMaxSharedBytes, "ms_deform_attn: ", pb.num_levels, " levels x ", pb.num_points,
              " points per head is too many for the CUDA kernel's shared-memory tables");
  LaunchShape shape;
  shape.problem = pb;
  shape.threads = threads;
  shape.blocks = (pb.num_groups * pb.group_size + threads - 1) / threads;
  shape.shared_bytes = shared_bytes;
  TORCH_CHECK(shape.blocks < (int64_t{1} << 31), "ms_deform_attn: problem too large for one launch");
  return shape;
}

bool vector_friendly(const at::Tensor& t, int vec, int channels) {
  return channels % vec == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % kVectorBytes == 0;
}

}  // namespace

at::Tensor forward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard device_guard(value.device());
  const auto shapes = spatial_shapes.to(value.device());
  const auto starts = level_start_index.to(value.device());
  auto output = at::empty({value.size(0), sampling_locations.size(1), value.size(2) * value.size(3)}, value.options());
  if (output.numel() == 0) return output;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    constexpr int kVec = kVectorBytes / sizeof(scalar_t);
    const bool vectorised = vector_friendly(value, kVec, static_cast<int>(value.size(3))) &&
                            vector_friendly(output, kVec, static_cast<int>(value.size(3)));
    const LaunchShape shape = plan_launch<acc_t>(value, sampling_locations, vectorised ? kVec : 1);
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(shape.blocks), shape.threads, shape.shared_bytes, stream>>>(
          value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          sampling_locations.data_ptr<acc_t>(), attention_weights.data_ptr<acc_t>(), output.data_ptr<scalar_t>(),
          shape.problem);
    };
    if (vectorised) {
      launch(forward_kernel<scalar_t, acc_t, kVec>);
    } else {
      launch(forward_kernel<scalar_t, acc_t, 1>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::vector<at::Tensor> backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  const c10::cuda::CUDAGuard device_guard(value.device());
  const auto shapes = spatial_shapes.to(value.device());
  const auto starts = level_start_index.to(value.device());
  const auto acc_type = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_type));
  auto grad_locations = at::empty_like(sampling_locations);
  auto grad_weights = at::empty_like(attention_weights);
  if (grad_output.numel() == 0) {
    grad_locations.zero_();
    grad_weights.zero_();
    return {grad_value_acc.to(value.scalar_type()), grad_locations, grad_weights};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    // The vector width follows the accumulator, not the value: every lane adds one 16-byte row of
    // acc_t atomics per corner, so half/bfloat16 run as many lanes per query as float32 does
    // (a 16-byte half/bfloat16 load would halve the lanes and double each lane's atomic chain).
    constexpr int kVec = kVectorBytes / sizeof(acc_t);
    const int channels = static_cast<int>(value.size(3));
    const bool vectorised = vector_friendly(value, kVec, channels) && vector_friendly(grad_output, kVec, channels);
    const LaunchShape shape = plan_launch<acc_t>(value, sampling_locations, vectorised ? kVec : 1);
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(shape.blocks), shape.threads, shape.shared_bytes, stream>>>(
          value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          sampling_locations.data_ptr<acc_t>(), attention_weights.data_ptr<acc_t>(),
          grad_output.data_ptr<scalar_t>(), grad_value_acc.data_ptr<acc_t>(), grad_locations.data_ptr<acc_t>(),
          grad_weights.data_ptr<acc_t>(), shape.problem);
    };
    if (vectorised) {
      launch(backward_kernel<scalar_t, acc_t, kVec>);
    } else {
      launch(backward_kernel<scalar_t, acc_t, 1>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto grad_value = value.scalar_type() == acc_type ? grad_value_acc : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace dino_msda
