#include "combine.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "../cpu_rows.h"
#include "../dispatch.h"
#include "../parallel.h"

namespace moepp::moe {

namespace {
constexpr int64_t kTokensPerWorker = 32;
constexpr int64_t kRowsPerWorker = 256;

// dy's rows that no FFN slot reads get their true gradient, 0; the others are written by their
// slot. (Zeroing all T * k rows first would write them twice, and most of dy is such rows when
// many slots go to zero-computation experts: 83% at tau 0.1 in the 0.6B layout.)
template <typename T>
void zero_unread_rows(const CombineArgs<T>& a, int num_threads) {
  const int64_t rows = a.tokens * a.k;
  std::vector<uint8_t> read(rows, 0);
  for (int64_t s = 0; s < rows; ++s) {
    const int32_t e = a.ids[s];
    if (e >= 0 && e < a.layout.n_ffn && in_range(a.slot_row[s], rows)) read[a.slot_row[s]] = 1;
  }
  parallel_for(rows, choose_workers(rows, num_threads, kRowsPerWorker), [&](int, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (!read[r]) std::memset(a.dy + r * a.dim, 0, sizeof(T) * a.dim);  // all-zero bits: 0 in fp32/fp16/bf16
    }
  });
}
}  // namespace

// One token at a time: the sum of spec "Combine" as a sequence of whole-row passes in fp32,
// each term in the order the CUDA kernel adds it.
template <typename T>
void combine_cpu(const CombineArgs<T>& a, int num_threads) {
  parallel_for(a.tokens, choose_workers(a.tokens, num_threads, kTokensPerWorker), [&](int, int64_t begin, int64_t end) {
    std::vector<float> acc(a.dim);
    for (int64_t t = begin; t < end; ++t) {
      TokenMix m;
      analyze_token(a.layout, a.k, a.ids + t * a.k, a.weights + t * a.k, a.slot_row + t * a.k, a.tokens * a.k,
                    a.mix + t * 2 * a.n_constant, m);
      if (m.uses_x()) {
        rows::scale(a.x + t * a.dim, m.x_coef, a.scale, a.dim, acc.data());
      } else {
        std::fill(acc.begin(), acc.end(), 0.0f);
      }
      for (int i = 0; i < m.n_const; ++i) {
        rows::add_scaled(a.const_value + m.const_id[i] * a.dim, m.const_w[i] * m.a2[i], a.dim, acc.data());
      }
      for (int f = 0; f < m.n_rows; ++f) rows::add_scaled(a.y + int64_t(m.row[f]) * a.dim, m.row_w[f], a.dim, acc.data());
      rows::scale(acc.data(), 1.0f, 1.0f, a.dim, a.out + t * a.dim);
    }
  });
}

template <typename T>
void combine_backward_cpu(const CombineArgs<T>& a, int num_threads) {
  zero_unread_rows(a, num_threads);
  parallel_for(a.tokens, choose_workers(a.tokens, num_threads, kTokensPerWorker), [&](int, int64_t begin, int64_t end) {
    float dot_v[kMaxSlots], dot_y[kMaxSlots];
    std::vector<float> g(a.dim);
    for (int64_t t = begin; t < end; ++t) {
      TokenMix m;
      analyze_token(a.layout, a.k, a.ids + t * a.k, a.weights + t * a.k, a.slot_row + t * a.k, a.tokens * a.k,
                    a.mix + t * 2 * a.n_constant, m);
      rows::scale(a.dout + t * a.dim, 1.0f, 1.0f, a.dim, g.data());
      const float dot_x = m.uses_x() ? a.scale * rows::dot(g.data(), a.x + t * a.dim, a.dim) : 0.0f;
      for (int i = 0; i < m.n_const; ++i) dot_v[i] = rows::dot(g.data(), a.const_value + m.const_id[i] * a.dim, a.dim);
      for (int f = 0; f < m.n_rows; ++f) {
        const int64_t row = int64_t(m.row[f]) * a.dim;
        dot_y[f] = rows::dot(g.data(), a.y + row, a.dim);
        rows::scale(g.data(), m.row_w[f], 1.0f, a.dim, a.dy + row);
      }
      rows::scale(g.data(), a.scale * m.x_coef, 1.0f, a.dim, a.dx + t * a.dim);
      token_gradients(m, a.k, a.n_constant, dot_x, dot_v, dot_y, a.dweights + t * a.k, a.dmix + t * 2 * a.n_constant,
                      a.v_coef + t * a.n_constant);
    }
  });
}

namespace {

template <typename T>
CombineArgs<T> make_args(const CombineViews& in, const ExpertLayout& layout, float scale) {
  const TensorView& x = in.x;
  const DeviceType dev = x.device;
  const int32_t idx = x.device_index;
  if (x.ndim != 2) throw_invalid("x", "expected shape [tokens, hidden]");
  if (in.ids.ndim != 2) throw_invalid("topk_ids", "expected shape [tokens, top_k]");
  const int64_t tokens = x.shape[0], dim = x.shape[1], k = in.ids.shape[1];
  if (k < 1 || k > kMaxSlots) throw_invalid("top_k", "must be in [1, 16]");
  if (!(0 <= layout.n_ffn && layout.n_ffn == layout.const_begin && layout.const_begin <= layout.copy_begin &&
        layout.copy_begin <= layout.zero_begin && layout.zero_begin <= layout.n_experts)) {
    throw_invalid("layout", "needs 0 <= n_ffn <= copy_begin <= zero_begin <= n_experts");
  }
  const int64_t n_constant = layout.copy_begin - layout.const_begin;
  const DType dt = DTypeOf<T>::value;
  check_view(x, "x", dt, {tokens, dim}, dev, idx);
  check_view(in.y, "y", dt, {tokens * k, dim}, dev, idx);
  check_view(in.ids, "topk_ids", DType::kInt32, {tokens, k}, dev, idx);
  check_view(in.weights, "topk_weights", DType::kFloat32, {tokens, k}, dev, idx);
  check_view(in.slot_row, "slot_row", DType::kInt32, {tokens, k}, dev, idx);
  check_view(in.mix, "const_logits", DType::kFloat32, {tokens, 2 * n_constant}, dev, idx);
  check_view(in.const_value, "const_value", dt, {n_constant, dim}, dev, idx);
  CombineArgs<T> a;
  a.tokens = tokens;
  a.dim = dim;
  a.k = static_cast<int>(k);
  a.n_constant = static_cast<int>(n_constant);
  a.layout = layout;
  a.scale = scale;
  a.x = x.ptr<T>();
  a.y = in.y.ptr<T>();
  a.ids = in.ids.ptr<int32_t>();
  a.weights = in.weights.ptr<float>();
  a.slot_row = in.slot_row.ptr<int32_t>();
  a.mix = in.mix.ptr<float>();
  a.const_value = in.const_value.ptr<T>();
  return a;
}

}  // namespace

void combine_forward(const CombineViews& in, const ExpertLayout& layout, float scale, const TensorView& out,
                     int num_threads, uintptr_t stream) {
  MOEPP_DISPATCH(in.x.dtype, "x", (float, Half, BFloat16), T, {
    CombineArgs<T> a = make_args<T>(in, layout, scale);
    check_view(out, "out", DTypeOf<T>::value, {a.tokens, a.dim}, in.x.device, in.x.device_index);
    a.out = out.ptr<T>();
    if (in.x.device == DeviceType::kCUDA) {
      combine_cuda(a, in.x.device_index, stream);
    } else {
      combine_cpu(a, num_threads);
    }
  });
}

void combine_backward(const CombineViews& in, const ExpertLayout& layout, float scale, const TensorView& dout,
                      const TensorView& dy, const TensorView& dx, const TensorView& dweights, const TensorView& dmix,
                      const TensorView& v_coef, int num_threads, uintptr_t stream) {
  MOEPP_DISPATCH(in.x.dtype, "x", (float, Half, BFloat16), T, {
    CombineArgs<T> a = make_args<T>(in, layout, scale);
    const DeviceType dev = in.x.device;
    const int32_t idx = in.x.device_index;
    const DType dt = DTypeOf<T>::value;
    check_view(dout, "grad_out", dt, {a.tokens, a.dim}, dev, idx);
    check_view(dy, "grad_y", dt, {a.tokens * a.k, a.dim}, dev, idx);
    check_view(dx, "grad_x", dt, {a.tokens, a.dim}, dev, idx);
    check_view(dweights, "grad_weights", DType::kFloat32, {a.tokens, a.k}, dev, idx);
    check_view(dmix, "grad_const_logits", DType::kFloat32, {a.tokens, 2 * a.n_constant}, dev, idx);
    check_view(v_coef, "const_value_coef", DType::kFloat32, {a.tokens, a.n_constant}, dev, idx);
    a.dout = dout.ptr<T>();
    a.dy = dy.ptr<T>();
    a.dx = dx.ptr<T>();
    a.dweights = dweights.ptr<float>();
    a.dmix = dmix.ptr<float>();
    a.v_coef = v_coef.ptr<float>();
    if (dev == DeviceType::kCUDA) {
      combine_backward_cuda(a, idx, stream);
    } else {
      combine_backward_cpu(a, num_threads);
    }
  });
}

#define MOEPP_INSTANTIATE(T)                                       \
  template void combine_cpu<T>(const CombineArgs<T>&, int);        \
  template void combine_backward_cpu<T>(const CombineArgs<T>&, int);
MOEPP_INSTANTIATE(float)
MOEPP_INSTANTIATE(Half)
MOEPP_INSTANTIATE(BFloat16)
#undef MOEPP_INSTANTIATE

}  // namespace moepp::moe
