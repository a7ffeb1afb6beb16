#include "combine.h"

#include <vector>

#include "../dispatch.h"
#include "../parallel.h"

namespace moepp::moe {

namespace {
constexpr int64_t kTokensPerWorker = 32;
}

template <typename T>
void combine_cpu(const CombineArgs<T>& a, int num_threads) {
  parallel_for(a.tokens, choose_workers(a.tokens, num_threads, kTokensPerWorker), [&](int, int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const TokenMix m = analyze_token(a.layout, a.k, a.ids + t * a.k, a.weights + t * a.k, a.slot_row + t * a.k,
                                       a.mix + t * 2 * a.n_constant);
      const T* x = a.x + t * a.dim;
      for (int64_t d = 0; d < a.dim; ++d) {
        float acc = m.uses_x() ? m.x_coef * (a.scale * to_float(x[d])) : 0.0f;
        for (int i = 0; i < m.n_const; ++i) {
          acc += m.const_w[i] * m.a2[i] * to_float(a.const_value[m.const_id[i] * a.dim + d]);
        }
        for (int f = 0; f < m.n_rows; ++f) acc += m.row_w[f] * to_float(a.y[int64_t(m.row[f]) * a.dim + d]);
        a.out[t * a.dim + d] = from_float<T>(acc);
      }
    }
  });
}

template <typename T>
void combine_backward_cpu(const CombineArgs<T>& a, int num_threads) {
  parallel_for(a.tokens, choose_workers(a.tokens, num_threads, kTokensPerWorker), [&](int, int64_t begin, int64_t end) {
    float dot_v[kMaxSlots], dot_y[kMaxSlots];
    for (int64_t t = begin; t < end; ++t) {
      const TokenMix m = analyze_token(a.layout, a.k, a.ids + t * a.k, a.weights + t * a.k, a.slot_row + t * a.k,
                                       a.mix + t * 2 * a.n_constant);
      const T* x = a.x + t * a.dim;
      const T* dout = a.dout + t * a.dim;
      float dot_x = 0.0f;
      for (int i = 0; i < m.n_const; ++i) dot_v[i] = 0.0f;
      for (int f = 0; f < m.n_rows; ++f) dot_y[f] = 0.0f;
      for (int64_t d = 0; d < a.dim; ++d) {
        const float g = to_float(dout[d]);
        if (m.uses_x()) dot_x += g * (a.scale * to_float(x[d]));
        for (int i = 0; i < m.n_const; ++i) dot_v[i] += g * to_float(a.const_value[m.const_id[i] * a.dim + d]);
        for (int f = 0; f < m.n_rows; ++f) {
          dot_y[f] += g * to_float(a.y[int64_t(m.row[f]) * a.dim + d]);
          a.dy[int64_t(m.row[f]) * a.dim + d] = from_float<T>(m.row_w[f] * g);
        }
        a.dx[t * a.dim + d] = from_float<T>(a.scale * m.x_coef * g);
      }
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
