// Attention over a packed batch of float32 sequences on the CPU, in one call for every sequence and head.
//
// q [T, Hq, D], k and v [T, Hkv, D] (rows may be strided, e.g. views into one fused qkv output; the last
// dimension must be contiguous), cu_seqlens [B + 1] int64 marking where each sequence starts, out
// [T, Hq, D] contiguous. Each sequence attends to itself only; causal masks keys after the query. Query
// head h reads key/value head h / (Hq / Hkv) (grouped-query attention). Optional: window >= 0 keeps the keys
// at most that far from the query (the left side only when causal; only those keys are computed), softcap > 0
// caps the scaled scores at softcap * tanh(s / softcap), and rel_bias [Hq, 2C + 1] adds rel_bias[h][j - i + C]
// to score (i, j) after the cap (a relative position bias; C + 1 >= the longest sequence).
//
// Work is split into (sequence, head, up to TASK_ROWS query rows) tasks that ATen's threads take longest
// first. A task copies its keys out once, transposed, then takes its rows BLOCK_ROWS at a
// time: the scores against every key with a register-blocked micro-kernel, a row softmax with a
// polynomial exp, the product with the values. Rows are kept whole (no online softmax): a block's scores
// take BLOCK_ROWS x length floats per thread (4 MiB at 32K tokens). Vectors are GCC vector extensions of
// 16 floats: one AVX-512 register, two AVX2, four NEON.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <optional>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int W = 16;          // floats per vector (hmax and hsum assume 16)
constexpr int BLOCK_ROWS = 32; // query rows whose scores are held at once
constexpr int TASK_ROWS = 256; // query rows per task (one transpose of the keys each)
constexpr int MR = 8;          // query rows per micro-kernel
constexpr int NV = 2;          // vectors of keys (QK) or of head dims (PV) per micro-kernel: with MR, 16
                               // accumulators, enough to hide the FMA latency (8 x 2 ran at 1.8x 4 x 2)

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

inline vf splat(float x) { return x - vf{}; }  // one broadcast (0 + x would keep a scalar add for -0)

// exp for x <= 0 (scores minus their row maximum), Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2,
// exp(r) by a degree-5 minimax polynomial, 2^n by building the float's exponent bits. About 1 ulp.
inline vf exp_nonpositive(vf x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;  // exp(-87) ~ 1.6e-38, still a normal float
  const vf shifter = splat(12582912.0f);     // 1.5 * 2^23: adding it rounds to the nearest integer
  vf n = (x * splat(1.44269504088896341f) + shifter) - shifter;
  vf r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * (vf)bits;
}

// horizontal max and sum by halving (a serial loop over the 16 lanes cost as much as the exps of a row)
inline float hmax(vf v) {
  vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  a = a > b ? a : b;
  vf4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3), d = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  c = c > d ? c : d;
  return std::max(std::max(c[0], c[1]), std::max(c[2], c[3]));
}

inline float hsum(vf v) {
  vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  vf4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (c[0] + c[1]) + (c[2] + c[3]);
}

struct Strides {
  int64_t q, k, v, out;  // floats between consecutive tokens
};

// What changes the scores beyond scale and causal, and the keys query i sees: [lo(i), hi(i)) of a sequence
// of length L.
struct Mods {
  bool causal;
  int64_t window;           // < 0: none
  float softcap;            // <= 0: none
  const float* rel_bias;    // [Hq][rel_stride] or null
  int64_t rel_stride, rel_center;
  int64_t lo(int64_t i) const { return window >= 0 ? std::max<int64_t>(0, i - window) : 0; }
  int64_t hi(int64_t i, int64_t L) const {
    return causal ? i + 1 : (window >= 0 ? std::min<int64_t>(L, i + window + 1) : L);
  }
};

// scores[r][0:kb] = scale * q_r . k_j for rows [0, R); kt is [D][kpad] (keys zero past the last).
template <int R>
void qk_rows(const float* q, int64_t q_stride, const float* kt, int64_t kpad, int64_t kb, int64_t D, float scale,
             float* scores) {
  int64_t j = 0;
  for (; j + NV * W <= kb; j += NV * W) {
    vf acc[R][NV] = {};
    for (int64_t d = 0; d < D; ++d) {
      vf kv[NV];
      for (int c = 0; c < NV; ++c) kv[c] = load(kt + d * kpad + j + c * W);
      for (int r = 0; r < R; ++r) {
        vf qv = splat(q[r * q_stride + d]);
        for (int c = 0; c < NV; ++c) acc[r][c] += qv * kv[c];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < NV; ++c) store(scores + r * kpad + j + c * W, acc[r][c] * scale);
  }
  for (; j < kb; j += W) {
    vf acc[R] = {};
    for (int64_t d = 0; d < D; ++d) {
      vf kv = load(kt + d * kpad + j);
      for (int r = 0; r < R; ++r) acc[r] += splat(q[r * q_stride + d]) * kv;
    }
    for (int r = 0; r < R; ++r) store(scores + r * kpad + j, acc[r] * scale);
  }
}

// out_r = sum_j p[r][j] v_j over keys j < keys for rows [0, R), head dims [0, C * W), scaled by inv_sum[r]
template <int R, int C>
void pv_tile(const float* p, int64_t kpad, const float* v, int64_t v_stride, int64_t keys, const float* inv_sum,
             float* out, int64_t out_stride) {
  vf acc[R][C] = {};
  for (int64_t j = 0; j < keys; ++j) {
    vf vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load(v + j * v_stride + c * W);
    for (int r = 0; r < R; ++r) {
      vf pr = splat(p[r * kpad + j]);
      for (int c = 0; c < C; ++c) acc[r][c] += pr * vv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) store(out + r * out_stride + c * W, acc[r][c] * inv_sum[r]);
}

// the same over every head dim: tiles of NV vectors, then one vector if D / W is odd
template <int R>
void pv_rows(const float* p, int64_t kpad, const float* v, int64_t v_stride, int64_t keys, int64_t D,
             const float* inv_sum, float* out, int64_t out_stride) {
  int64_t c0 = 0;
  for (; c0 + NV * W <= D; c0 += NV * W)
    pv_tile<R, NV>(p, kpad, v + c0, v_stride, keys, inv_sum, out + c0, out_stride);
  if (c0 < D) pv_tile<R, 1>(p, kpad, v + c0, v_stride, keys, inv_sum, out + c0, out_stride);
}

// fn(std::integral_constant<int, R>) for a row count R in [1, MR)
template <typename Fn>
void with_rows(int64_t rows, Fn&& fn) {
  static_assert(MR == 8, "with_rows lists the row counts below MR");
  switch (rows) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    default: break;
  }
}

// Softmax of each row over its columns [lo[r], hi[r]) (the others in [c0, kb) become 0), after the soft-cap
// and the bias row (bias[r][j] for column j, or none); 1 / sum -> inv_sum. c0 is a multiple of W.
void softmax_rows(float* scores, int64_t kpad, int64_t c0, int64_t kb, int64_t rows, const int64_t* lo,
                  const int64_t* hi, float softcap, const float* const* bias, float* inv_sum) {
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * kpad;
    const int64_t a = lo[r], n = hi[r];
    if (softcap > 0.0f)
      for (int64_t j = a; j < n; ++j) s[j] = softcap * std::tanh(s[j] / softcap);
    if (bias != nullptr)
      for (int64_t j = a; j < n; ++j) s[j] += bias[r][j];
    for (int64_t j = c0; j < a; ++j) s[j] = ninf;
    for (int64_t j = n; j < kb; ++j) s[j] = ninf;
    const int64_t used = (n + W - 1) / W * W;  // vectors holding the row's keys; the -inf ends -> 0
    vf m = splat(ninf);
    for (int64_t j = c0; j < used; j += W) {
      vf x = load(s + j);
      m = x > m ? x : m;
    }
    const vf mv = splat(hmax(m));
    vf sum = {};
    for (int64_t j = c0; j < used; j += W) {
      vf e = exp_nonpositive(load(s + j) - mv);
      store(s + j, e);
      sum += e;
    }
    // the masked ends came out as exp(-87) ~ 1e-38, nothing next to the maximum's exp(0) = 1 in the sum
    for (int64_t j = c0; j < a; ++j) s[j] = 0.0f;
    for (int64_t j = n; j < kb; ++j) s[j] = 0.0f;
    inv_sum[r] = 1.0f / hsum(sum);
  }
}

struct Task {
  int64_t start, len, head, heads, row0, rows;  // query heads [head, head + heads) share one key/value head
  int64_t k0, k1;                               // the keys its rows see: [k0, k1) of the sequence
};

// One task: query rows [row0, row0 + rows) of one sequence for query heads that share a key/value head,
// BLOCK_ROWS at a time after its keys [k0, k1) are transposed once into kt [D][kpad] (column c holds key
// k0 + c); values are read in place. A block computes the columns from its first row's first key (rounded
// down to a vector) to its last row's last.
void attend_rows(const Task& t, const float* q, const float* k, const float* v, float* out, const Strides& st,
                 int64_t D, int64_t group, const Mods& mods, float scale, std::vector<float>& kt_buf,
                 std::vector<float>& score_buf) {
  const int64_t L = t.len, k0 = t.k0, keys_max = t.k1 - t.k0;
  const int64_t kpad = (keys_max + W - 1) / W * W;
  const int64_t kv_head = t.head / group;
  if (static_cast<int64_t>(kt_buf.size()) < D * kpad) kt_buf.resize(D * kpad);
  if (static_cast<int64_t>(score_buf.size()) < BLOCK_ROWS * kpad) score_buf.resize(BLOCK_ROWS * kpad);
  float* kt = kt_buf.data();
  const float* kh = k + (t.start + k0) * st.k + kv_head * D;
  for (int64_t d = 0; d < D; ++d) {
    float* row = kt + d * kpad;
    for (int64_t j = 0; j < keys_max; ++j) row[j] = kh[j * st.k + d];
    for (int64_t j = keys_max; j < kpad; ++j) row[j] = 0.0f;
  }
  const float* vh = v + (t.start + k0) * st.v + kv_head * D;
  float* scores = score_buf.data();
  int64_t lo[BLOCK_ROWS], hi[BLOCK_ROWS];
  const float* bias[BLOCK_ROWS];
  float inv_sum[BLOCK_ROWS];
  for (int64_t h = t.head; h < t.head + t.heads; ++h)
  for (int64_t b0 = t.row0; b0 < t.row0 + t.rows; b0 += BLOCK_ROWS) {
    const int64_t rows = std::min<int64_t>(BLOCK_ROWS, t.row0 + t.rows - b0);
    for (int64_t r = 0; r < rows; ++r) {
      lo[r] = mods.lo(b0 + r) - k0;
      hi[r] = mods.hi(b0 + r, L) - k0;
      // column c is key k0 + c: its bias is rel_bias[h][k0 + c - i + center]
      if (mods.rel_bias != nullptr) bias[r] = mods.rel_bias + h * mods.rel_stride + mods.rel_center + k0 - (b0 + r);
    }
    const int64_t c0 = lo[0] / W * W, kb = (hi[rows - 1] + W - 1) / W * W;
    const float* qh = q + (t.start + b0) * st.q + h * D;
    float* oh = out + (t.start + b0) * st.out + h * D;
    const int64_t full = rows / MR * MR;
    for (int64_t r = 0; r < full; r += MR)
      qk_rows<MR>(qh + r * st.q, st.q, kt + c0, kpad, kb - c0, D, scale, scores + r * kpad + c0);
    with_rows(rows - full, [&](auto R) {
      qk_rows<decltype(R)::value>(qh + full * st.q, st.q, kt + c0, kpad, kb - c0, D, scale,
                                  scores + full * kpad + c0);
    });
    softmax_rows(scores, kpad, c0, kb, rows, lo, hi, mods.softcap, mods.rel_bias != nullptr ? bias : nullptr,
                 inv_sum);
    // a tile of rows stops at its last row's keys: the earlier rows' probabilities are zero past theirs
    for (int64_t r = 0; r < full; r += MR)
      pv_rows<MR>(scores + r * kpad + c0, kpad, vh + c0 * st.v, st.v, hi[r + MR - 1] - c0, D, inv_sum + r,
                  oh + r * st.out, st.out);
    with_rows(rows - full, [&](auto R) {
      pv_rows<decltype(R)::value>(scores + full * kpad + c0, kpad, vh + c0 * st.v, st.v, hi[rows - 1] - c0, D,
                                  inv_sum + full, oh + full * st.out, st.out);
    });
  }
}

void varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
                      bool causal, double scale, at::Tensor& out, int64_t window, double softcap,
                      const std::optional<at::Tensor>& rel_bias) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && out.device().is_cpu(),
              "varlen_attention: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat,
              "varlen_attention: float32 only");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && out.dim() == 3, "varlen_attention: 3-D tensors");
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == T && v.size(0) == T && v.size(1) == Hkv && k.size(2) == D && v.size(2) == D,
              "varlen_attention: q, k and v disagree in shape");
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous(), "varlen_attention: out must be contiguous like q");
  TORCH_CHECK(D % W == 0, "varlen_attention: head_dim must be a multiple of ", W);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "varlen_attention: query heads must be a multiple of key/value heads");
  for (const at::Tensor* x : {&q, &k, &v})
    TORCH_CHECK(x->stride(2) == 1 && x->stride(1) == D, "varlen_attention: heads must be packed rows of head_dim");
  TORCH_CHECK(cu_seqlens.device().is_cpu() && cu_seqlens.scalar_type() == at::kLong && cu_seqlens.dim() == 1 &&
                  cu_seqlens.is_contiguous(),
              "varlen_attention: cu_seqlens must be a contiguous int64 CPU tensor");
  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  const int64_t B = cu_seqlens.numel() - 1;
  TORCH_CHECK(B >= 0 && cu[0] == 0 && cu[B] == T, "varlen_attention: cu_seqlens must run from 0 to num_tokens");
  Mods mods{causal, window, static_cast<float>(softcap), nullptr, 0, 0};
  if (rel_bias.has_value()) {
    const at::Tensor& rb = *rel_bias;
    TORCH_CHECK(rb.device().is_cpu() && rb.scalar_type() == at::kFloat && rb.dim() == 2 && rb.is_contiguous() &&
                    rb.size(0) == Hq && rb.size(1) % 2 == 1,
                "varlen_attention: rel_bias must be a contiguous float32 [heads, 2C + 1] CPU tensor");
    mods.rel_bias = rb.data_ptr<float>();
    mods.rel_stride = rb.size(1);
    mods.rel_center = (rb.size(1) - 1) / 2;
  }

  // Query heads that share a key/value head share a task (one transpose of the keys), as long as that
  // leaves at least two tasks a thread; else the group is halved until it does.
  const int64_t group = Hq / Hkv;
  int64_t heads_per_task = group;
  while (heads_per_task % 2 == 0 && B * (Hq / heads_per_task) < 2 * at::get_num_threads()) heads_per_task /= 2;
  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = cu[b + 1] - cu[b];
    TORCH_CHECK(len >= 0, "varlen_attention: cu_seqlens must not decrease");
    TORCH_CHECK(mods.rel_bias == nullptr || len <= mods.rel_center + 1,
                "varlen_attention: rel_bias [heads, 2C + 1] needs C + 1 >= every sequence's length");
    for (int64_t h = 0; h < Hq; h += heads_per_task)
      for (int64_t r = 0; r < len; r += TASK_ROWS) {
        const int64_t rows = std::min<int64_t>(TASK_ROWS, len - r);
        tasks.push_back({cu[b], len, h, heads_per_task, r, rows, mods.lo(r), mods.hi(r + rows - 1, len)});
      }
  }
  // longest first, taken in turn by whichever thread is free: the threads finish together
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) {
    return (a.k1 - a.k0) * a.rows * a.heads > (b.k1 - b.k0) * b.rows * b.heads;
  });
  const Strides st{q.stride(0), k.stride(0), v.stride(0), out.stride(0)};
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), num_tasks), 1, [&](int64_t, int64_t) {
    std::vector<float> kt_buf, score_buf;
    for (int64_t i = next++; i < num_tasks; i = next++)
      attend_rows(tasks[i], qp, kp, vp, op, st, D, group, mods, s, kt_buf, score_buf);
  });
}

}  // namespace

TORCH_LIBRARY(tp_embed, m) {
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, bool causal, float scale, Tensor(a!) out, "
        "int window=-1, float softcap=0.0, Tensor? rel_bias=None) -> ()");
}

TORCH_LIBRARY_IMPL(tp_embed, CPU, m) { m.impl("varlen_attention", varlen_attention); }
