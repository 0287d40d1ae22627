// The select scheme on the CPU in one pass each way: element j of the kernel is copies[i_j, j], with i_j the
// draw of lightning_mk.schemes.Random.integers(k) (the same hash, bit for bit), decoded block by block and
// never stored; the gradient is written as k one-hot rows in one pass (no zero-fill, no index, no scatter).
// The kernels move bits: elements are handled as unsigned integers of their size, blended by masks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t BLOCK = 960;  // elements decoded at a time: a multiple of 32 / width for every width

inline uint32_t mix(uint32_t x) {  // lightning_mk.schemes._mix
  x = ((x >> 16) ^ x) * 0x45D9F3Bu;
  x = ((x >> 16) ^ x) * 0x45D9F3Bu;
  return (x >> 16) ^ x;
}

// Random.integers(high) of the stream state ^ constant: for high = 2**width (width >= 1), element j takes
// bits [(j % L) * width, (j % L + 1) * width) of hash(j / L), L = 32 / width lanes; otherwise (hash(j) * high) >> 32.
struct Draw {
  uint32_t seed;
  uint64_t high;
  int width = 0;
  Draw(const at::Tensor& state, int64_t constant, int64_t high_)
      : seed(static_cast<uint32_t>(state.item<int64_t>() ^ constant)), high(static_cast<uint64_t>(high_)) {
    TORCH_CHECK(high_ >= 1, "select: at least one copy, got ", high_);
    while ((uint64_t(1) << width) < high) ++width;
    if (high != (uint64_t(1) << width)) width = 0;
  }
};

typedef uint32_t lanes8 __attribute__((vector_size(32)));

// idx[0 : m] = the draws of elements j0 .. j0 + m (j0 a multiple of BLOCK)
template <int WIDTH>
__attribute__((target_clones("avx2", "default")))
void decode_lanes(uint32_t seed, int64_t j0, int64_t m, uint32_t* __restrict__ idx) {
  constexpr int LANES = 32 / WIDTH;
  const int64_t w0 = j0 / LANES, words = (m + LANES - 1) / LANES;
  uint32_t h[BLOCK];
  for (int64_t w = 0; w < words; ++w) h[w] = mix(static_cast<uint32_t>(w0 + w) ^ seed);
  if constexpr (LANES % 8 == 0) {  // 8 lanes of a hash at once: shift a broadcast by 8 lane offsets
    lanes8 shifts[LANES / 8];
    for (int g = 0; g < LANES / 8; ++g)
      for (int i = 0; i < 8; ++i) shifts[g][i] = (g * 8 + i) * WIDTH;
    const lanes8 mask = lanes8{} + ((1u << WIDTH) - 1);
    uint32_t full[BLOCK];
    for (int64_t w = 0; w < words; ++w) {
      const lanes8 hash = lanes8{} + h[w];
      for (int g = 0; g < LANES / 8; ++g) {
        const lanes8 v = (hash >> shifts[g]) & mask;
        std::memcpy(full + w * LANES + g * 8, &v, sizeof v);
      }
    }
    std::memcpy(idx, full, m * sizeof(uint32_t));
  } else {
    for (int64_t t = 0; t < m; ++t) idx[t] = (h[t / LANES] >> (t % LANES * WIDTH)) & ((1u << WIDTH) - 1);
  }
}

__attribute__((target_clones("avx2", "default")))
void decode_scaled(uint32_t seed, uint64_t high, int64_t j0, int64_t m, uint32_t* __restrict__ idx) {
  for (int64_t t = 0; t < m; ++t) idx[t] = static_cast<uint32_t>((mix(static_cast<uint32_t>(j0 + t) ^ seed) * high) >> 32);
}

void decode(const Draw& d, int64_t j0, int64_t m, uint32_t* idx) {
  switch (d.width) {
    case 1: return decode_lanes<1>(d.seed, j0, m, idx);
    case 2: return decode_lanes<2>(d.seed, j0, m, idx);
    case 3: return decode_lanes<3>(d.seed, j0, m, idx);
    case 4: return decode_lanes<4>(d.seed, j0, m, idx);
    case 5: return decode_lanes<5>(d.seed, j0, m, idx);
    case 6: return decode_lanes<6>(d.seed, j0, m, idx);
    case 7: return decode_lanes<7>(d.seed, j0, m, idx);
    case 8: return decode_lanes<8>(d.seed, j0, m, idx);
    case 0: return decode_scaled(d.seed, d.high, j0, m, idx);
    default: {  // wider than a byte: k > 256 copies
      const int64_t lanes = 32 / d.width;
      const uint32_t mask = (1u << d.width) - 1;
      for (int64_t t = 0; t < m; ++t)
        idx[t] = (mix(static_cast<uint32_t>((j0 + t) / lanes) ^ d.seed) >> ((j0 + t) % lanes * d.width)) & mask;
    }
  }
}

// f(j0, m, idx) for every block of n elements, in parallel
template <typename F>
void blocks(const Draw& d, int64_t n, const F& f) {
  at::parallel_for(0, (n + BLOCK - 1) / BLOCK, 16, [&](int64_t begin, int64_t end) {
    uint32_t idx[BLOCK];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t j0 = b * BLOCK, m = std::min(BLOCK, n - j0);
      decode(d, j0, m, idx);
      f(j0, m, idx);
    }
  });
}

template <typename U>
U all_or_none(bool on) { return U(0) - U(on); }

template <typename U>
void gather(const U* src, U* dst, const Draw& d, int64_t k, int64_t n) {
  blocks(d, n, [&](int64_t j0, int64_t m, const uint32_t* __restrict__ idx) {
    U* __restrict__ out = dst + j0;
    std::memcpy(out, src + j0, m * sizeof(U));
    for (int64_t r = 1; r < k; ++r) {
      const U* __restrict__ row = src + r * n + j0;
      for (int64_t t = 0; t < m; ++t) {
        const U on = all_or_none<U>(idx[t] == static_cast<uint32_t>(r));
        out[t] = (out[t] & ~on) | (row[t] & on);
      }
    }
  });
}

// out[r, j] = chosen[j] where r is element j's copy, else other[j] (0 without other)
template <typename U>
void one_hot(const U* chosen, const U* other, U* dst, const Draw& d, int64_t k, int64_t n) {
  blocks(d, n, [&](int64_t j0, int64_t m, const uint32_t* __restrict__ idx) {
    const U* __restrict__ picked = chosen + j0;
    const U* __restrict__ rest = other ? other + j0 : nullptr;
    for (int64_t r = 0; r < k; ++r) {
      U* __restrict__ out = dst + r * n + j0;
      const uint32_t row = static_cast<uint32_t>(r);
      if (rest) {
        for (int64_t t = 0; t < m; ++t) {
          const U on = all_or_none<U>(idx[t] == row);
          out[t] = (picked[t] & on) | (rest[t] & ~on);
        }
      } else {
        for (int64_t t = 0; t < m; ++t) out[t] = picked[t] & all_or_none<U>(idx[t] == row);
      }
    }
  });
}

template <typename Run>
void by_size(const at::Tensor& t, const Run& run) {
  switch (t.element_size()) {
    case 2: return run(uint16_t{});
    case 4: return run(uint32_t{});
    case 8: return run(uint64_t{});
    default: TORCH_CHECK(false, "select: elements of 2, 4 or 8 bytes, got ", t.element_size());
  }
}

at::Tensor select_forward(const at::Tensor& copies, const at::Tensor& state, int64_t constant) {
  TORCH_CHECK(copies.dim() == 2, "select: copies must be [k, n], got ", copies.sizes());
  const auto c = copies.contiguous();
  const int64_t k = c.size(0), n = c.size(1);
  const Draw d(state, constant, k);
  auto out = at::empty({n}, c.options());
  by_size(c, [&](auto u) {
    using U = decltype(u);
    gather<U>(static_cast<const U*>(c.const_data_ptr()), static_cast<U*>(out.mutable_data_ptr()), d, k, n);
  });
  return out;
}

void select_backward_into(at::Tensor& out, const at::Tensor& chosen, const std::optional<at::Tensor>& other,
                          const at::Tensor& state, int64_t constant) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "select: out must be a contiguous [k, n], got ", out.sizes());
  const int64_t k = out.size(0), n = out.size(1);
  const auto a = chosen.contiguous();
  TORCH_CHECK(a.numel() == n && a.scalar_type() == out.scalar_type(), "select: chosen must be n values of out's dtype");
  at::Tensor b;
  if (other) {
    b = other->contiguous();
    TORCH_CHECK(b.numel() == n && b.scalar_type() == out.scalar_type(), "select: other must be n values of out's dtype");
  }
  const Draw d(state, constant, k);
  by_size(out, [&](auto u) {
    using U = decltype(u);
    one_hot<U>(static_cast<const U*>(a.const_data_ptr()), b.defined() ? static_cast<const U*>(b.const_data_ptr()) : nullptr,
               static_cast<U*>(out.mutable_data_ptr()), d, k, n);
  });
}

at::Tensor select_backward(const at::Tensor& grad, const at::Tensor& state, int64_t constant, int64_t k) {
  auto out = at::empty({k, grad.numel()}, grad.options());
  select_backward_into(out, grad, std::nullopt, state, constant);
  return out;
}

at::Tensor select_index(const at::Tensor& state, int64_t constant, int64_t high, int64_t n) {
  const Draw d(state, constant, high);
  auto out = at::empty({n}, state.options().dtype(at::kLong));
  int64_t* dst = out.mutable_data_ptr<int64_t>();
  blocks(d, n, [&](int64_t j0, int64_t m, const uint32_t* idx) { std::copy(idx, idx + m, dst + j0); });
  return out;
}

// The ops through the dispatcher, so that fake tensors (torch.compile's tracing) reach their fake kernels.
at::Tensor call_select(const at::Tensor& copies, const at::Tensor& state, int64_t constant) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lightning_mk::select", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(copies, state, constant);
}

at::Tensor call_select_backward(const at::Tensor& grad, const at::Tensor& state, int64_t constant, int64_t k) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lightning_mk::select_backward", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  return op.call(grad, state, constant, k);
}

at::Tensor call_select_index(const at::Tensor& state, int64_t constant, int64_t high, int64_t n) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lightning_mk::select_index", "")
      .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t)>();
  return op.call(state, constant, high, n);
}

// Autograd in C++: a Python autograd node costs more than the whole draw of a small kernel.
class Select : public torch::autograd::Function<Select> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& copies, const at::Tensor& state,
                            int64_t constant) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["k"] = copies.size(0);
    ctx->saved_data["constant"] = constant;
    ctx->saved_data["state"] = state.clone();  // the draw's, should the model's state move on before the backward
    return call_select(copies, state, constant);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const int64_t k = ctx->saved_data["k"].toInt(), constant = ctx->saved_data["constant"].toInt();
    const auto state = ctx->saved_data["state"].toTensor();
    const auto& grad = grads[0];
    if (at::GradMode::is_enabled()) {  // a double backward (create_graph): differentiable ops only
      const auto index = call_select_index(state, constant, k, grad.numel()).view({1, -1});
      return {at::zeros({k, grad.numel()}, grad.options()).scatter_add(0, index, grad.reshape({1, -1})), {}, {}};
    }
    return {call_select_backward(grad, state, constant, k), {}, {}};
  }
};

at::Tensor select_autograd(const at::Tensor& copies, const at::Tensor& state, int64_t constant) {
  return Select::apply(copies, state, constant);
}

// A copy of the step's state, as an op of its own: compiled, the copy is saved for the backward (a clone would be
// recomputed there from the model's state, which a later training forward moves on in place).
at::Tensor stream_state(const at::Tensor& state) { return state.clone(); }

}  // namespace

TORCH_LIBRARY(lightning_mk, m) {
  m.def("select(Tensor copies, Tensor state, int constant) -> Tensor");
  m.def("select_backward(Tensor grad, Tensor state, int constant, int k) -> Tensor");
  m.def("select_index(Tensor state, int constant, int high, int n) -> Tensor");
  m.def("stream_state(Tensor state) -> Tensor");
  m.def("select_backward_into(Tensor(a!) out, Tensor chosen, Tensor? other, Tensor state, int constant) -> ()");
}

TORCH_LIBRARY_IMPL(lightning_mk, CPU, m) {
  m.impl("select", &select_forward);
  m.impl("select_backward", &select_backward);
  m.impl("select_index", &select_index);
  m.impl("select_backward_into", &select_backward_into);
  m.impl("stream_state", &stream_state);
}

TORCH_LIBRARY_IMPL(lightning_mk, Autograd, m) {
  m.impl("select", &select_autograd);
}
