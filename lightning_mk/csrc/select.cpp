// The select scheme on the CPU in one pass each way: element j of the kernel is copies[i_j, j], with i_j the
// draw of lightning_mk.schemes.Random.integers(k) (the same hash, bit for bit), decoded block by block and
// never stored; the gradient is written as k one-hot rows in one pass (no zero-fill, no index, no scatter).
// The kernels move bits: elements are handled as unsigned integers of their size, blended by masks. The decoupled
// forms' variants (select_around, its backward) add their arithmetic in the same pass, each operation rounded as the
// stock ops' (built with -ffp-contract=off), and normaliser gives the relative form's noise scale in one pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// The loops over a block's elements, compiled for the widest vectors an x86 CPU has (chosen at load time; elsewhere
// for the build's target)
#if defined(__x86_64__) && defined(__GNUC__)
#define VECTORISED __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTORISED
#endif

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
VECTORISED
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

VECTORISED
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

// out[0 : m] = the drawn copies' elements j0 .. j0 + m of the [k, n] src (n: the elements of a copy)
template <typename U>
VECTORISED
void blend(const U* src, U* __restrict__ out, const uint32_t* __restrict__ idx, int64_t k, int64_t n, int64_t j0,
           int64_t m) {
  std::memcpy(out, src + j0, m * sizeof(U));
  for (int64_t r = 1; r < k; ++r) {
    const U* __restrict__ row = src + r * n + j0;
    for (int64_t t = 0; t < m; ++t) {
      const U on = all_or_none<U>(idx[t] == static_cast<uint32_t>(r));
      out[t] = (out[t] & ~on) | (row[t] & on);
    }
  }
}

// dst[r, j0 + t] = picked[t] where r is the element's copy, else rest[t] (0 without rest), for t < m
template <typename U>
VECTORISED
void one_hot(const U* __restrict__ picked, const U* __restrict__ rest, U* dst, const uint32_t* __restrict__ idx,
             int64_t k, int64_t n, int64_t j0, int64_t m) {
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
}

// The unsigned integer type of a float type's size: the kernels move elements as bits
template <typename T>
using bits_of = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;

template <typename Run>
void by_size(const at::Tensor& t, const Run& run) {
  switch (t.element_size()) {
    case 2: return run(uint16_t{});
    case 4: return run(uint32_t{});
    case 8: return run(uint64_t{});
    default: TORCH_CHECK(false, "select: elements of 2, 4 or 8 bytes, got ", t.element_size());
  }
}

// [k, *S]: the copies' shape of a kernel shaped S
std::vector<int64_t> copies_shape(int64_t k, at::IntArrayRef kernel) {
  std::vector<int64_t> shape{k};
  shape.insert(shape.end(), kernel.begin(), kernel.end());
  return shape;
}

// k and n (the elements of S) of [k, *S] copies; `what` names them in the error
std::pair<int64_t, int64_t> rows_of(const at::Tensor& copies, const char* what) {
  TORCH_CHECK(copies.dim() >= 1 && copies.size(0) >= 1, what, " must be [k, *S] with k >= 1, got ", copies.sizes());
  return {copies.size(0), copies.numel() / copies.size(0)};
}

// copies [k, *S] -> [*S] (no reshapes around the op: on a small kernel each costs as much as the draw)
at::Tensor select_forward(const at::Tensor& copies, const at::Tensor& state, int64_t constant) {
  const auto kn = rows_of(copies, "select: copies");
  const int64_t k = kn.first, n = kn.second;
  const auto c = copies.contiguous();
  const Draw d(state, constant, k);
  auto out = at::empty(c.sizes().slice(1), c.options());
  by_size(c, [&](auto u) {
    using U = decltype(u);
    const U* src = static_cast<const U*>(c.const_data_ptr());
    U* dst = static_cast<U*>(out.mutable_data_ptr());
    blocks(d, n, [&](int64_t j0, int64_t m, const uint32_t* idx) { blend<U>(src, dst + j0, idx, k, n, j0, m); });
  });
  return out;
}

// grad [*S] -> [k, *S]
at::Tensor select_backward(const at::Tensor& grad, const at::Tensor& state, int64_t constant, int64_t k) {
  const auto g = grad.contiguous();
  const int64_t n = g.numel();
  auto out = at::empty(copies_shape(k, g.sizes()), g.options());
  const Draw d(state, constant, k);
  by_size(g, [&](auto u) {
    using U = decltype(u);
    const U* src = static_cast<const U*>(g.const_data_ptr());
    U* dst = static_cast<U*>(out.mutable_data_ptr());
    blocks(d, n, [&](int64_t j0, int64_t m, const uint32_t* idx) { one_hot<U>(src + j0, nullptr, dst, idx, k, n, j0, m); });
  });
  return out;
}

// out = out - center and out = out * factor + mu, each operation rounded to T: together the decoupled forms' kernel
// (mu + f (deviation - center)) from the drawn deviation (the loops are functions of restrict pointers, which the
// compiler vectorises)
template <typename T>
VECTORISED
void minus_center(T* __restrict__ out, const T* __restrict__ center, int64_t m) {
  using acc = at::opmath_type<T>;
  for (int64_t t = 0; t < m; ++t) out[t] = static_cast<T>(static_cast<acc>(out[t]) - static_cast<acc>(center[t]));
}

template <typename T>
VECTORISED
void scale_add(T* __restrict__ out, const T* __restrict__ mu, at::opmath_type<T> factor, int64_t m) {
  using acc = at::opmath_type<T>;
  for (int64_t t = 0; t < m; ++t) {
    const T scaled = static_cast<T>(static_cast<acc>(out[t]) * factor);
    out[t] = static_cast<T>(static_cast<acc>(scaled) + static_cast<acc>(mu[t]));
  }
}

// o = grad * s, p = o * share: picked = p + o, rest = p, each operation rounded to T
template <typename T>
VECTORISED
void shares(const T* __restrict__ grad, T* __restrict__ picked, T* __restrict__ rest, at::opmath_type<T> s,
            at::opmath_type<T> share, int64_t m) {
  using acc = at::opmath_type<T>;
  for (int64_t t = 0; t < m; ++t) {
    const T o = static_cast<T>(static_cast<acc>(grad[t]) * s);
    const T p = static_cast<T>(static_cast<acc>(o) * share);
    rest[t] = p;
    picked[t] = static_cast<T>(static_cast<acc>(p) + static_cast<acc>(o));
  }
}

void check_row(const at::Tensor& row, int64_t n, const at::Tensor& like, const char* name) {
  TORCH_CHECK(row.numel() == n && row.scalar_type() == like.scalar_type(), "select: ", name, " must be ", n,
              " values of dtype ", like.scalar_type(), ", got ", row.sizes(), " of ", row.scalar_type());
}

// The squares of rows - mid (CENTERED: mid holds elements j0 .. j0 + m; else of the rows) summed over elements
// j0 .. j0 + m of the [k, n] rows: each difference rounded to T as the stock subtraction, squares summed in 16 lanes
// (independent sums, so that the loop is vectorised rather than one long chain; float, double for double), the lanes
// in order.
template <typename T, bool CENTERED>
VECTORISED
double block_squares(const T* x, const T* __restrict__ mid, int64_t k, int64_t n, int64_t j0, int64_t m) {
  using acc = at::opmath_type<T>;
  constexpr int64_t LANES = 16;  // BLOCK is a multiple
  const auto value = [&](const T* __restrict__ row, int64_t t) {
    if constexpr (CENTERED)
      return static_cast<acc>(static_cast<T>(static_cast<acc>(row[t]) - static_cast<acc>(mid[t])));
    else
      return static_cast<acc>(row[t]);
  };
  acc lanes[LANES] = {};
  for (int64_t r = 0; r < k; ++r) {
    const T* __restrict__ row = x + r * n + j0;
    int64_t t = 0;
    if constexpr (std::is_same_v<T, acc>) {  // float, double: the lanes as one vector (the loop below is not vectorised)
      typedef acc lanes_t __attribute__((vector_size(LANES * sizeof(acc))));
      lanes_t sum;
      std::memcpy(&sum, lanes, sizeof sum);
      for (; t + LANES <= m; t += LANES) {
        lanes_t v;
        std::memcpy(&v, row + t, sizeof v);
        if constexpr (CENTERED) {
          lanes_t c;
          std::memcpy(&c, mid + t, sizeof c);
          v = v - c;
        }
        sum += v * v;
      }
      std::memcpy(lanes, &sum, sizeof sum);
    } else {
      for (; t + LANES <= m; t += LANES)
        for (int64_t l = 0; l < LANES; ++l) {
          const acc v = value(row, t + l);
          lanes[l] += v * v;
        }
    }
    for (; t < m; ++t) {
      const acc v = value(row, t);
      lanes[t % LANES] += v * v;
    }
  }
  double total = 0;
  for (const acc v : lanes) total += v;
  return total;
}

// mid[0 : m] = the mean of the [k, n] rows over elements j0 .. j0 + m, as forms._mean: the sum (in order, in the
// accumulation type, rounded to T) divided by k and rounded to T (the stock sum's order up to k = 4; above, to
// rounding)
template <typename T>
VECTORISED
void block_center(const T* x, int64_t k, int64_t n, int64_t j0, int64_t m, T* __restrict__ mid) {
  using acc = at::opmath_type<T>;
  acc sum[BLOCK];
  for (int64_t t = 0; t < m; ++t) sum[t] = static_cast<acc>(x[j0 + t]);
  for (int64_t r = 1; r < k; ++r) {
    const T* __restrict__ row = x + r * n + j0;
    for (int64_t t = 0; t < m; ++t) sum[t] += static_cast<acc>(row[t]);
  }
  const acc count = static_cast<acc>(k);
  for (int64_t t = 0; t < m; ++t) mid[t] = static_cast<T>(static_cast<acc>(static_cast<T>(sum[t])) / count);
}

// RMS(mu) / RMS(rows - center), at most 1e6 (equal rows give no noise), from the sums of squares
double scale_of(double mu_squares, double spread_squares, int64_t k, int64_t n) {
  const double size = std::sqrt(mu_squares / static_cast<double>(n));
  const double spread = std::sqrt(spread_squares / static_cast<double>(k * n));
  return size / std::max({spread, 1e-6 * size, 1e-30});
}

// The relative form's noise scale RMS(mu) / RMS(rows - center) of [k, *S] rows, without the [k, *S] difference:
// forms._normaliser in one op. The blocks' sums (block_squares) are added in double and in order: the stock ops' value
// to rounding, the same for any number of threads.
at::Tensor normaliser(const at::Tensor& mu, const at::Tensor& rows, const at::Tensor& center) {
  const auto kn = rows_of(rows, "normaliser: rows");
  const int64_t k = kn.first, n = kn.second, count = (n + BLOCK - 1) / BLOCK;
  const auto src = rows.contiguous(), middle = center.contiguous(), base = mu.contiguous();
  check_row(middle, n, src, "center");
  check_row(base, n, src, "mu");
  std::vector<double> sizes(count), spreads(count);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "normaliser", [&] {
    using T = scalar_t;
    const T *x = src.const_data_ptr<T>(), *ctr = middle.const_data_ptr<T>(), *m0 = base.const_data_ptr<T>();
    at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t j0 = b * BLOCK, m = std::min(BLOCK, n - j0);
        sizes[b] = block_squares<T, false>(m0, nullptr, 1, n, j0, m);
        spreads[b] = block_squares<T, true>(x, ctr + j0, k, n, j0, m);
      }
    });
  });
  double size = 0, spread = 0;
  for (int64_t b = 0; b < count; ++b) size += sizes[b], spread += spreads[b];
  return at::scalar_tensor(scale_of(size, spread, k, n), src.options());
}

// The decoupled forms' training kernel from the stored [mu, deviations] ([k + 1, *S]): mu_j + f (deviations[i_j, j] -
// center_j), center their mean (block_center), f = c, times the relative form's noise scale where normalise (the
// deviations' and mu's squares summed in the same pass as the draw), each operation rounded to the dtype as the stock
// ops' (_mean, sub_, mul_, add_): their values up to k = 4 (the noise scale to rounding), in one pass over the rows
// rather than five. Returns the kernel and f (one value of the dtype, for the gradient).
std::pair<at::Tensor, at::Tensor> select_around_impl(const at::Tensor& stored, const at::Tensor& state,
                                                     int64_t constant, const at::Tensor& c, bool normalise) {
  TORCH_CHECK(stored.dim() >= 1 && stored.size(0) >= 2, "select: stored must be [k + 1, *S] with k >= 1, got ",
              stored.sizes());
  TORCH_CHECK(c.numel() == 1, "select: c must be one value, got ", c.sizes());
  const auto whole = stored.contiguous();
  const auto src = whole.narrow(0, 1, whole.size(0) - 1), base = whole.select(0, 0);
  const int64_t k = src.size(0), n = base.numel(), count = (n + BLOCK - 1) / BLOCK;
  const Draw d(state, constant, k);
  auto out = at::empty(src.sizes().slice(1), src.options());
  auto factor = c.to(src.scalar_type(), false, true).reshape({});  // a copy: an output of an op never aliases an input
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "select_around", [&] {
    using T = scalar_t;
    using acc = at::opmath_type<T>;
    using U = bits_of<T>;
    const T* x = src.const_data_ptr<T>();
    const T* m0 = base.const_data_ptr<T>();
    T* dst = out.mutable_data_ptr<T>();
    // normalise: every element's squares come before any element's value (they give f), so the pass over the rows
    // leaves the centred draw in out and a second pass, over out and mu alone, scales it and adds mu (rather than
    // reading the rows twice); else one pass
    std::vector<double> sizes(normalise ? count : 0), spreads(normalise ? count : 0);
    const acc given = factor.item<acc>();
    blocks(d, n, [&](int64_t j0, int64_t m, const uint32_t* idx) {
      T mid[BLOCK];
      T* __restrict__ o = dst + j0;
      block_center<T>(x, k, n, j0, m, mid);
      blend<U>(reinterpret_cast<const U*>(x), reinterpret_cast<U*>(o), idx, k, n, j0, m);
      minus_center<T>(o, mid, m);
      if (normalise) {
        sizes[j0 / BLOCK] = block_squares<T, false>(m0, nullptr, 1, n, j0, m);
        spreads[j0 / BLOCK] = block_squares<T, true>(x, mid, k, n, j0, m);
      } else {
        scale_add<T>(o, m0 + j0, given, m);
      }
    });
    if (normalise) {
      double size = 0, spread = 0;
      for (int64_t b = 0; b < count; ++b) size += sizes[b], spread += spreads[b];
      const T scale = static_cast<T>(scale_of(size, spread, k, n));  // the stock ops' c = level * scale, in T
      factor = at::scalar_tensor(static_cast<acc>(factor.item<T>()) * static_cast<acc>(scale), factor.options());
      const acc f = factor.item<acc>();
      at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t j0 = b * BLOCK;
          scale_add<T>(dst + j0, m0 + j0, f, std::min(BLOCK, n - j0));
        }
      });
    }
  });
  return {out, factor};
}

// select_around_impl's kernel as an op (the gradient's arguments, decay and grad_scale, are SelectAround's)
at::Tensor select_around(const at::Tensor& stored, const at::Tensor& state, int64_t constant, const at::Tensor& c,
                         bool normalise, const std::optional<at::Tensor>& decay, double grad_scale) {
  return select_around_impl(stored, state, constant, c, normalise).first;
}

// select_around's gradient of the copies into the contiguous [k, *S] out: with o = grad * scale and p = o * (-1/k),
// o + p at element j's copy and p at the others, each operation rounded as the stock ops' (one pass, no autograd).
void rows_grad(const at::Tensor& out, const at::Tensor& grad, const at::Tensor& scale, const at::Tensor& state,
               int64_t constant) {
  const auto kn = rows_of(out, "select: out");
  const int64_t k = kn.first, n = kn.second;
  TORCH_CHECK(out.is_contiguous(), "select: out must be contiguous");
  const auto g = grad.contiguous();
  check_row(g, n, out, "grad");
  TORCH_CHECK(scale.numel() == 1, "select: scale must be one value, got ", scale.sizes());
  const Draw d(state, constant, k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "select_around_backward", [&] {
    using T = scalar_t;
    using acc = at::opmath_type<T>;
    using U = bits_of<T>;
    const acc s = scale.item<acc>(), share = static_cast<acc>(-1.0 / static_cast<double>(k));
    const T* src = g.const_data_ptr<T>();
    U* dst = static_cast<U*>(out.mutable_data_ptr());
    blocks(d, n, [&](int64_t j0, int64_t m, const uint32_t* idx) {
      T picked[BLOCK], rest[BLOCK];
      shares<T>(src + j0, picked, rest, s, share, m);
      one_hot<U>(reinterpret_cast<const U*>(picked), reinterpret_cast<const U*>(rest), dst, idx, k, n, j0, m);
    });
  });
}

// select_around_impl as an op: the kernel and f
std::tuple<at::Tensor, at::Tensor> select_around_forward(const at::Tensor& stored, const at::Tensor& state,
                                                         int64_t constant, const at::Tensor& c, bool normalise) {
  auto [kernel, factor] = select_around_impl(stored, state, constant, c, normalise);
  return {kernel, factor};
}

// The stored tensor's gradient, [k + 1, *S] in one uninitialised tensor: grad (+ decay mu) for mu, rows_grad for the
// deviations (scale: f times the gradient scale)
at::Tensor select_around_backward(const at::Tensor& grad, const at::Tensor& stored, const at::Tensor& scale,
                                  const at::Tensor& state, int64_t constant, const std::optional<at::Tensor>& decay) {
  auto stored_grad = at::empty(stored.sizes(), grad.options());
  auto head = stored_grad.select(0, 0);
  if (decay.has_value() && decay->defined())
    at::addcmul_out(head, grad, decay->to(grad.scalar_type()), stored.select(0, 0));
  else
    head.copy_(grad);
  rows_grad(stored_grad.narrow(0, 1, stored.size(0) - 1), grad, scale, state, constant);
  return stored_grad;
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

std::tuple<at::Tensor, at::Tensor> call_select_around_forward(const at::Tensor& stored, const at::Tensor& state,
                                                              int64_t constant, const at::Tensor& c, bool normalise) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lightning_mk::select_around_forward", "")
      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, bool)>();
  return op.call(stored, state, constant, c, normalise);
}

at::Tensor call_select_around_backward(const at::Tensor& grad, const at::Tensor& stored, const at::Tensor& scale,
                                       const at::Tensor& state, int64_t constant, const std::optional<at::Tensor>& decay) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lightning_mk::select_around_backward", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                        const std::optional<at::Tensor>&)>();
  return op.call(grad, stored, scale, state, constant, decay);
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
      const auto flat = at::zeros({k, grad.numel()}, grad.options()).scatter_add(0, index, grad.reshape({1, -1}));
      return {flat.view(copies_shape(k, grad.sizes())), {}, {}};
    }
    return {call_select_backward(grad, state, constant, k), {}, {}};
  }
};

at::Tensor select_autograd(const at::Tensor& copies, const at::Tensor& state, int64_t constant) {
  return Select::apply(copies, state, constant);
}

// select_around with its gradient: g + decay mu for mu and grad_scale f g (onehot_i - 1/k) for deviation i, written
// into one uninitialised tensor (forms.Decoupled.select; forms._Selected is the same node with an index, of stock ops).
class SelectAround : public torch::autograd::Function<SelectAround> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& stored, const at::Tensor& state,
                            int64_t constant, const at::Tensor& c, bool normalise,
                            const std::optional<at::Tensor>& decay, double grad_scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [kernel, factor] = call_select_around_forward(stored, state, constant, c, normalise);
    ctx->saved_data["constant"] = constant;
    ctx->saved_data["state"] = state.clone();  // the draw's, should the model's state move on before the backward
    ctx->saved_data["grad_scale"] = grad_scale;
    ctx->save_for_backward({stored, factor, decay.value_or(at::Tensor())});
    return kernel;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &stored = saved[0], &factor = saved[1], &decay = saved[2];
    const auto state = ctx->saved_data["state"].toTensor();
    const int64_t constant = ctx->saved_data["constant"].toInt(), k = stored.size(0) - 1;
    const auto scale = factor * ctx->saved_data["grad_scale"].toDouble();
    const auto& grad = grads[0];
    if (at::GradMode::is_enabled()) {  // a double backward (create_graph): differentiable ops only
      const auto g = grad.reshape({1, -1}), mu = stored[0].reshape({1, -1});
      const auto index = call_select_index(state, constant, k, g.numel()).view({1, -1});
      const auto offset = g * scale;  // the gradient of the chosen deviation
      const auto mu_grad = decay.defined() ? g + decay.to(g.scalar_type()) * mu : g;
      const auto rows = at::zeros({k, offset.size(1)}, offset.options()).scatter_add(0, index, offset) - offset / k;
      return {at::cat({mu_grad, rows}).view(stored.sizes()), {}, {}, {}, {}, {}, {}};
    }
    const auto stored_grad = call_select_around_backward(grad, stored, scale, state, constant,
                                                         decay.defined() ? std::optional<at::Tensor>(decay) : std::nullopt);
    return {stored_grad, {}, {}, {}, {}, {}, {}};
  }
};

at::Tensor select_around_autograd(const at::Tensor& stored, const at::Tensor& state, int64_t constant, const at::Tensor& c,
                                  bool normalise, const std::optional<at::Tensor>& decay, double grad_scale) {
  return SelectAround::apply(stored, state, constant, c, normalise, decay, grad_scale);
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
  m.def("select_around(Tensor stored, Tensor state, int constant, Tensor c, bool normalise, Tensor? decay, "
        "float grad_scale) -> Tensor");
  m.def("normaliser(Tensor mu, Tensor rows, Tensor center) -> Tensor");
  m.def("select_around_forward(Tensor stored, Tensor state, int constant, Tensor c, bool normalise) -> (Tensor, Tensor)");
  m.def("select_around_backward(Tensor grad, Tensor stored, Tensor scale, Tensor state, int constant, Tensor? decay) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(lightning_mk, CPU, m) {
  m.impl("select", &select_forward);
  m.impl("select_backward", &select_backward);
  m.impl("select_index", &select_index);
  m.impl("stream_state", &stream_state);
  m.impl("select_around", &select_around);
  m.impl("normaliser", &normaliser);
  m.impl("select_around_forward", &select_around_forward);
  m.impl("select_around_backward", &select_around_backward);
}

TORCH_LIBRARY_IMPL(lightning_mk, Autograd, m) {
  m.impl("select", &select_autograd);
  m.impl("select_around", &select_around_autograd);
}
