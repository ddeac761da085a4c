// CPU kernels for multi-scale deformable attention (float32 and float64).
//
// Forward: parallel over (batch, query); each sampling point's bilinear footprint (four corner rows
// and weights) is computed once, its rows prefetched, and applied to all D channels in one
// vectorisable loop.
// Backward: parallel over (batch, head), so every thread owns the slice grad_value[n, :, m, :] it
// scatters into: no atomics and a deterministic result.
#include "ms_deform_attn.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace dino_msda {
namespace {

// One sampling point's bilinear footprint. Corners are ordered (x0, y0), (x1, y0), (x0, y1),
// (x1, y1). A corner outside the map gets weight 0 and reads a row of zeros, which matches
// grid_sample's zero padding without branches in the channel loops.
template <typename scalar_t>
struct Footprint {
  int64_t index[4];  // spatial index into S, or -1 when the corner is outside the map
  scalar_t weight[4];
  scalar_t fx;
  scalar_t fy;
};

// Returns false when no corner of the point lies on the map (nothing to read, zero gradients).
template <typename scalar_t>
inline bool bilinear_footprint(
    scalar_t loc_x, scalar_t loc_y, int64_t height, int64_t width, int64_t level_start,
    Footprint<scalar_t>& fp) {
  // align_corners=False: pixel centres sit at (i + 0.5) / size.
  const scalar_t x = loc_x * static_cast<scalar_t>(width) - scalar_t(0.5);
  const scalar_t y = loc_y * static_cast<scalar_t>(height) - scalar_t(0.5);
  // Written so that NaN locations also take the early exit.
  if (!(x >= scalar_t(-1) && x < static_cast<scalar_t>(width) && y >= scalar_t(-1) &&
        y < static_cast<scalar_t>(height))) {
    return false;
  }
  const scalar_t x_floor = std::floor(x);
  const scalar_t y_floor = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x_floor);
  const int64_t y0 = static_cast<int64_t>(y_floor);
  fp.fx = x - x_floor;
  fp.fy = y - y_floor;
  const scalar_t gx = scalar_t(1) - fp.fx;
  const scalar_t gy = scalar_t(1) - fp.fy;
  const bool x0_in = x0 >= 0;
  const bool x1_in = x0 + 1 < width;
  const bool y0_in = y0 >= 0;
  const bool y1_in = y0 + 1 < height;
  const int64_t row0 = level_start + y0 * width;
  const int64_t row1 = row0 + width;
  fp.index[0] = (x0_in && y0_in) ? row0 + x0 : -1;
  fp.index[1] = (x1_in && y0_in) ? row0 + x0 + 1 : -1;
  fp.index[2] = (x0_in && y1_in) ? row1 + x0 : -1;
  fp.index[3] = (x1_in && y1_in) ? row1 + x0 + 1 : -1;
  fp.weight[0] = fp.index[0] >= 0 ? gx * gy : scalar_t(0);
  fp.weight[1] = fp.index[1] >= 0 ? fp.fx * gy : scalar_t(0);
  fp.weight[2] = fp.index[2] >= 0 ? gx * fp.fy : scalar_t(0);
  fp.weight[3] = fp.index[3] >= 0 ? fp.fx * fp.fy : scalar_t(0);
  return true;
}

struct Levels {
  std::vector<int64_t> height, width, start;
};

Levels read_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, int64_t num_keys) {
  const auto shapes = spatial_shapes.to(at::kCPU, at::kLong).contiguous();
  const auto starts = level_start_index.to(at::kCPU, at::kLong).contiguous();
  const int64_t num_levels = shapes.size(0);
  Levels levels;
  const int64_t* shape_ptr = shapes.data_ptr<int64_t>();
  const int64_t* start_ptr = starts.data_ptr<int64_t>();
  for (int64_t l = 0; l < num_levels; ++l) {
    const int64_t h = shape_ptr[2 * l], w = shape_ptr[2 * l + 1], s = start_ptr[l];
    // Bounds are checked here once so the kernels can index without checks.
    TORCH_CHECK(h >= 0 && w >= 0 && s >= 0 && s + h * w <= num_keys, "ms_deform_attn: level ", l,
                " (H=", h, ", W=", w, ", start=", s, ") does not fit in value's S=", num_keys,
                "; spatial_shapes and level_start_index must describe value's key axis");
    levels.height.push_back(h);
    levels.width.push_back(w);
    levels.start.push_back(s);
  }
  return levels;
}

// Prefetching every corner row of a head's points before using any of them lets the loads,
// which are scattered over the value tensor, overlap instead of stalling one point at a time.
#if defined(__GNUC__) || defined(__clang__)
#define DINO_PREFETCH(ptr) __builtin_prefetch((ptr))
#else
#define DINO_PREFETCH(ptr) ((void)0)
#endif

// A point's corners resolved to row pointers: rows outside the map point at a zero row (reads)
// or a scratch row (gradient writes) and carry weight zero.
template <typename scalar_t>
struct CornerRows {
  int64_t point;             // index into sampling_locations / attention_weights
  const scalar_t* value[4];
  scalar_t* grad[4];         // backward only
  scalar_t weight[4];        // bilinear weight (backward) or bilinear x attention weight (forward)
  scalar_t fx, fy, attention, width, height;
};

// Fills rows[] with the points of one (batch, query, head) that touch the map; returns how many.
template <typename scalar_t>
int64_t resolve_points(
    const Levels& levels, const scalar_t* locations, const scalar_t* weights, int64_t point_base,
    int64_t num_levels, int64_t num_points, const scalar_t* head_value, scalar_t* head_grad, int64_t row_stride,
    int64_t channels, const scalar_t* zeros, scalar_t* scratch, bool fold_attention, CornerRows<scalar_t>* rows) {
  int64_t used = 0;
  for (int64_t l = 0; l < num_levels; ++l) {
    for (int64_t p = 0; p < num_points; ++p) {
      const int64_t point = point_base + l * num_points + p;
      Footprint<scalar_t> fp;
      if (!bilinear_footprint(locations[2 * point], locations[2 * point + 1], levels.height[l], levels.width[l],
                              levels.start[l], fp)) {
        continue;
      }
      CornerRows<scalar_t>& r = rows[used++];
      r.point = point;
      r.attention = weights[point];
      r.fx = fp.fx;
      r.fy = fp.fy;
      r.width = static_cast<scalar_t>(levels.width[l]);
      r.height = static_cast<scalar_t>(levels.height[l]);
      for (int k = 0; k < 4; ++k) {
        r.weight[k] = fold_attention ? r.attention * fp.weight[k] : fp.weight[k];
        if (fp.index[k] >= 0) {
          r.value[k] = head_value + fp.index[k] * row_stride;
          DINO_PREFETCH(r.value[k]);
          DINO_PREFETCH(r.value[k] + channels - 1);
          // (Prefetching the gradient rows for writing as well measured no faster.)
          r.grad[k] = head_grad != nullptr ? head_grad + fp.index[k] * row_stride : nullptr;
        } else {
          r.value[k] = zeros;
          r.grad[k] = scratch;
        }
      }
    }
  }
  return used;
}

template <typename scalar_t>
void forward_kernel(
    const scalar_t* value, const Levels& levels, const scalar_t* locations, const scalar_t* weights,
    scalar_t* output, int64_t batch, int64_t num_keys, int64_t num_heads, int64_t channels,
    int64_t num_queries, int64_t num_levels, int64_t num_points) {
  const int64_t row_stride = num_heads * channels;  // elements between neighbouring keys
  const int64_t points_per_head = num_levels * num_points;
  const std::vector<scalar_t> zeros(channels, scalar_t(0));
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, num_heads * points_per_head));
  at::parallel_for(0, batch * num_queries, grain, [&](int64_t begin, int64_t end) {
    std::vector<CornerRows<scalar_t>> rows(points_per_head);
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / num_queries;
      for (int64_t m = 0; m < num_heads; ++m) {
        const scalar_t* head_value = value + n * num_keys * row_stride + m * channels;
        const int64_t used = resolve_points(levels, locations, weights, (nq * num_heads + m) * points_per_head,
                                            num_levels, num_points, head_value, static_cast<scalar_t*>(nullptr),
                                            row_stride, channels, zeros.data(), static_cast<scalar_t*>(nullptr),
                                            /*fold_attention=*/true, rows.data());
        scalar_t* __restrict__ out = output + (nq * num_heads + m) * channels;
        std::fill(out, out + channels, scalar_t(0));
        for (int64_t i = 0; i < used; ++i) {
          const CornerRows<scalar_t>& r = rows[i];
          const scalar_t w0 = r.weight[0], w1 = r.weight[1], w2 = r.weight[2], w3 = r.weight[3];
          const scalar_t* __restrict__ v0 = r.value[0];
          const scalar_t* __restrict__ v1 = r.value[1];
          const scalar_t* __restrict__ v2 = r.value[2];
          const scalar_t* __restrict__ v3 = r.value[3];
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) {
            out[c] += w0 * v0[c] + w1 * v1[c] + w2 * v2[c] + w3 * v3[c];
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(
    const scalar_t* value, const Levels& levels, const scalar_t* locations, const scalar_t* weights,
    const scalar_t* grad_output, scalar_t* grad_value, scalar_t* grad_locations, scalar_t* grad_weights,
    int64_t batch, int64_t num_keys, int64_t num_heads, int64_t channels, int64_t num_queries,
    int64_t num_levels, int64_t num_points) {
  const int64_t row_stride = num_heads * channels;
  const int64_t points_per_head = num_levels * num_points;
  const std::vector<scalar_t> zeros(channels, scalar_t(0));
  at::parallel_for(0, batch * num_heads, 1, [&](int64_t begin, int64_t end) {
    // Corners outside the map scatter into this scratch row, which is never read.
    std::vector<scalar_t> scratch(channels, scalar_t(0));
    std::vector<CornerRows<scalar_t>> rows(points_per_head);
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / num_heads;
      const int64_t m = nm % num_heads;
      const scalar_t* head_value = value + n * num_keys * row_stride + m * channels;
      scalar_t* head_grad_value = grad_value + n * num_keys * row_stride + m * channels;
      for (int64_t q = 0; q < num_queries; ++q) {
        const int64_t nqm = (n * num_queries + q) * num_heads + m;
        const int64_t used = resolve_points(levels, locations, weights, nqm * points_per_head, num_levels,
                                            num_points, head_value, head_grad_value, row_stride, channels,
                                            zeros.data(), scratch.data(), /*fold_attention=*/false, rows.data());
        const scalar_t* __restrict__ go = grad_output + nqm * channels;
        for (int64_t i = 0; i < used; ++i) {
          const CornerRows<scalar_t>& r = rows[i];
          const scalar_t a = r.attention;
          const scalar_t w0 = r.weight[0], w1 = r.weight[1], w2 = r.weight[2], w3 = r.weight[3];
          const scalar_t aw0 = a * w0, aw1 = a * w1, aw2 = a * w2, aw3 = a * w3;
          const scalar_t fx = r.fx, fy = r.fy, gx = scalar_t(1) - fx, gy = scalar_t(1) - fy;
          const scalar_t* __restrict__ v0 = r.value[0];
          const scalar_t* __restrict__ v1 = r.value[1];
          const scalar_t* __restrict__ v2 = r.value[2];
          const scalar_t* __restrict__ v3 = r.value[3];
          scalar_t* g0 = r.grad[0];
          scalar_t* g1 = r.grad[1];
          scalar_t* g2 = r.grad[2];
          scalar_t* g3 = r.grad[3];
          scalar_t d_weight = 0, d_x = 0, d_y = 0;
          // The four corners are distinct rows (or the shared scratch row, whose content is
          // never read), so vector lanes never overlap.
#pragma omp simd reduction(+ : d_weight, d_x, d_y)
          for (int64_t c = 0; c < channels; ++c) {
            const scalar_t g = go[c];
            const scalar_t x0 = v0[c], x1 = v1[c], x2 = v2[c], x3 = v3[c];
            d_weight += g * (w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3);
            d_x += g * ((x1 - x0) * gy + (x3 - x2) * fy);
            d_y += g * ((x2 - x0) * gx + (x3 - x1) * fx);
            g0[c] += aw0 * g;
            g1[c] += aw1 * g;
            g2[c] += aw2 * g;
            g3[c] += aw3 * g;
          }
          grad_weights[r.point] = d_weight;
          grad_locations[2 * r.point] = a * r.width * d_x;
          grad_locations[2 * r.point + 1] = a * r.height * d_y;
        }
      }
    }
  });
}

}  // namespace

at::Tensor forward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const int64_t batch = value.size(0), num_keys = value.size(1), num_heads = value.size(2), channels = value.size(3);
  const int64_t num_queries = sampling_locations.size(1), num_levels = sampling_locations.size(3);
  const int64_t num_points = sampling_locations.size(4);
  const Levels levels = read_levels(spatial_shapes, level_start_index, num_keys);
  auto output = at::empty({batch, num_queries, num_heads * channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(
        value.data_ptr<scalar_t>(), levels, sampling_locations.data_ptr<scalar_t>(),
        attention_weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), batch, num_keys, num_heads,
        channels, num_queries, num_levels, num_points);
  });
  return output;
}

std::vector<at::Tensor> backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  const int64_t batch = value.size(0), num_keys = value.size(1), num_heads = value.size(2), channels = value.size(3);
  const int64_t num_queries = sampling_locations.size(1), num_levels = sampling_locations.size(3);
  const int64_t num_points = sampling_locations.size(4);
  const Levels levels = read_levels(spatial_shapes, level_start_index, num_keys);
  auto grad_value = at::zeros_like(value);
  // Zero-filled: points that miss every map are skipped by the kernel.
  auto grad_locations = at::zeros_like(sampling_locations);
  auto grad_weights = at::zeros_like(attention_weights);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(
        value.data_ptr<scalar_t>(), levels, sampling_locations.data_ptr<scalar_t>(),
        attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(),
        grad_locations.data_ptr<scalar_t>(), grad_weights.data_ptr<scalar_t>(), batch, num_keys, num_heads,
        channels, num_queries, num_levels, num_points);
  });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace dino_msda
