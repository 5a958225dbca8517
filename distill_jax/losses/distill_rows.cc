// Fused per-row distillation loss on the CPU: an XLA FFI custom call.
//
// For each row r of the student logits s[N, V] + bs[V] and teacher logits
// t[N, V] + bt[V] (the output biases are added here, so the products can come
// straight from the matrix multiply; with mask_first, column 0, the padding
// item, is -inf for both):
//   ce[r] = logsumexp(s_r) - s_r[y_r]
//   kl[r] = KL(softmax(t_r / T) || softmax(s_r / T))
// and, for the `_grad` target, the gradient of
//   alpha * labelled_r * ce[r] + (1 - alpha) * T^2 * kl[r]
// with respect to s_r, times valid_r:
//   g = alpha * labelled * (softmax(s) - onehot(y)) + (1 - alpha) * T * (q - p)
// with q = softmax(s / T), p = softmax(t / T), and its column sums (the
// gradient of the student's output bias).
//
// XLA's CPU backend runs the same computation as about ten separate passes
// over the [N, V] blocks (row maxima, exp, row sums, selects, the gradient).
// Here each row is read from memory once for its maxima; the exponentials are
// kept in per-thread row buffers (a row of 12,102 floats is 48 KB, in L2) for
// the sums and the gradient, which is written once. The exponential is a
// polynomial written with GCC vector extensions, so the loops need no
// -ffast-math (which would break the -inf entries that mask padding items).
//
// Rows with valid == 0 are skipped: their ce and kl are 0, their gradient 0.
// Entries equal to -inf (masked items) get probability exactly 0.
//
// A row may have K labels y_r1..y_rK (the teacher's top-k, weight 1/K each):
// ce[r] = logsumexp(s_r) - mean_k s_r[y_rk], and the gradient's one-hot is
// their mean. With `seen` [N, S] (exclude_history), each row's listed ids
// (0: none) are -inf for student and teacher alike: they are added to the
// row's copy of the biases as -inf before the row and restored after it.
//
// Without a teacher (the `CeRows` targets: cross-entropy, for teachers and
// students trained alone) the teacher's passes are left out: ce alone, and
// the gradient softmax(s) - onehot(y) (alpha = 1).
//
// The `Hidden` targets take the student's hidden states h[N, D] and its
// transposed table et[D, V] instead of s, and compute s_r = h_r et + bs four
// rows at a time into a per-thread buffer (each slice of et is loaded once
// for the four rows). Each row's gradient then overwrites its logits there,
// and once the four rows are done the block's backward products are taken
// from cache: dh = g et^T (written), det += h^T g and the column sums
// (accumulated per thread, added up at the end). For the narrow student
// (D = 16 on Beauty) that is cheap arithmetic, where XLA's products would
// write the [N, V] logits and gradient to memory and read them back.
//
// The rows are shared out in chunks between the calling thread and tasks on
// XLA's own CPU thread pool (the FFI ThreadPool context).

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 8;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

inline vf splat(float x) { return vf{} + x; }

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

inline float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// exp(x) for x <= 0 (shifted logits), Cephes expf: range reduction by ln 2,
// a degree-5 polynomial, 2^n by exponent bits. Below -87.3 (the float range)
// and at -inf it returns exactly 0; NaN propagates.
inline vf exp_nonpos(vf x) {
  const vf lo = splat(-87.33654f);
  vf xc = x < lo ? lo : x;
  vf fx = xc * splat(1.44269504088896341f) + splat(0.5f);
  // floor(fx): truncate, then step down where truncation rounded up.
  vi ti = __builtin_convertvector(fx, vi);
  vf tf = __builtin_convertvector(ti, vf);
  vi down = tf > fx;  // -1 where true
  ti = ti + down;
  vf n = __builtin_convertvector(ti, vf);
  vf r = xc - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  vf r2 = r * r;
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  vf y = p * r2 + r + splat(1.0f);
  vi bits = (ti + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  y = y * scale;
  y = x < lo ? splat(0.0f) : y;
  return x != x ? x : y;
}

inline float exp_nonpos(float x) {
  vf v = splat(x);
  return exp_nonpos(v)[0];
}

struct Params {
  const float* s;  // [rows, cols]; nullptr: computed from h and et
  const float* h;  // [rows, dim] student hidden states (when s == nullptr)
  const float* et;  // [dim, cols] the student's table, transposed
  int64_t dim;
  const float* s_bias;
  const float* t;  // [rows, cols] teacher logits; nullptr: cross-entropy alone
  const float* t_bias;
  bool mask_first;
  const int32_t* labels;  // [rows, num_labels]
  int64_t num_labels;
  const int32_t* seen;  // [rows, num_seen] ids left out of the row (0: none)
  int64_t num_seen;
  const float* valid;
  const float* labelled;
  float temperature;
  float alpha;
  int64_t rows;
  int64_t cols;
  float* ce;
  float* kl;  // nullptr without a teacher
  float* grad;  // [rows, cols] (logits given); nullptr: no gradient
  float* dh;  // [rows, dim] (from hidden states); nullptr: no gradient
  // A block of a catalogue split along the items (a vocab-sharded table):
  // local column j is item col_offset + j; labels and seen ids are items.
  // Items >= valid_cols (a padded table's rows) are -inf like the padding.
  int64_t col_offset;
  int64_t valid_cols;
  // Two-phase mode for such blocks: `stats_out` [rows, kStats] receives each
  // row's statistics over this block (nothing else is written); `stats_in`
  // [rows, kStats] gives the whole row's instead, from which the gradient's
  // backward products are computed (no ce, no kl).
  float* stats_out;
  const float* stats_in;
};

// A row's statistics (two-phase mode): the student's maximum m_s,
// sum exp(s - m_s), sum exp((s - m_s) / T); the teacher's maximum m_t,
// sum exp((t - m_t) / T); the KL's cross term sum e^a (a - b) (a, b: the
// teacher's and student's shifted logits over T); the sum of the student's
// logits at the labels in this block, and how many labels are in it.
constexpr int kStats = 8;

// Rows of student logits computed together from the hidden states: each
// 8-column slice of the transposed table is loaded once for kBlock rows.
constexpr int kBlock = 4;

// out[i * cols + j] = s_bias[j] + sum_k h[r0 + i, k] * et[k, j] for i < nr
// (rows i >= nr of `out`, kBlock rows in all, get the bias alone); `hb` is
// scratch for kBlock * dim broadcast vectors.
void StudentLogits(const Params& p, int64_t r0, int64_t nr, vf* hb, float* out) {
  const int64_t v = p.cols, d = p.dim;
  const int64_t vec_end = v - v % kLanes;
  for (int i = 0; i < kBlock; ++i) {
    for (int64_t k = 0; k < d; ++k) hb[i * d + k] = splat(i < nr ? p.h[(r0 + i) * d + k] : 0.0f);
  }
  const vf* h0 = hb;
  const vf* h1 = hb + d;
  const vf* h2 = hb + 2 * d;
  const vf* h3 = hb + 3 * d;
  for (int64_t j = 0; j < vec_end; j += kLanes) {
    const vf b = load(p.s_bias + j);
    vf a0 = b, a1 = b, a2 = b, a3 = b;
    const float* e = p.et + j;
    for (int64_t k = 0; k < d; ++k, e += v) {
      const vf x = load(e);
      a0 += x * h0[k];
      a1 += x * h1[k];
      a2 += x * h2[k];
      a3 += x * h3[k];
    }
    store(out + j, a0);
    store(out + v + j, a1);
    store(out + 2 * v + j, a2);
    store(out + 3 * v + j, a3);
  }
  for (int64_t j = vec_end; j < v; ++j) {
    for (int i = 0; i < kBlock; ++i) {
      float acc = p.s_bias[j];
      for (int64_t k = 0; k < d; ++k) acc += hb[i * d + k][0] * p.et[k * v + j];
      out[i * v + j] = acc;
    }
  }
}

// The backward products of a block of kBlock gradient rows g (rows >= nr
// are zero), in cache: dh[r0 + i, k] = sum_j g[i, j] et[k, j] (written),
// det[k, j] += sum_i h[r0 + i, k] g[i, j] and colsum[j] += sum_i g[i, j]
// (accumulated). `hb` holds the block's broadcast hidden states.
void BlockBackward(const Params& p, int64_t r0, int64_t nr, const vf* hb, const float* g,
                   float* det, float* colsum) {
  const int64_t v = p.cols, d = p.dim;
  const int64_t vec_end = v - v % kLanes;
  const float* g0 = g;
  const float* g1 = g + v;
  const float* g2 = g + 2 * v;
  const float* g3 = g + 3 * v;
  for (int64_t j = 0; j < vec_end; j += kLanes) {
    store(colsum + j,
          load(colsum + j) + (load(g0 + j) + load(g1 + j)) + (load(g2 + j) + load(g3 + j)));
  }
  for (int64_t j = vec_end; j < v; ++j) colsum[j] += (g0[j] + g1[j]) + (g2[j] + g3[j]);
  for (int64_t k = 0; k < d; ++k) {
    const float* e = p.et + k * v;
    float* de = det + k * v;
    const vf c0 = hb[k], c1 = hb[d + k], c2 = hb[2 * d + k], c3 = hb[3 * d + k];
    vf a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < vec_end; j += kLanes) {
      const vf x = load(e + j);
      const vf y0 = load(g0 + j), y1 = load(g1 + j), y2 = load(g2 + j), y3 = load(g3 + j);
      a0 += y0 * x;
      a1 += y1 * x;
      a2 += y2 * x;
      a3 += y3 * x;
      store(de + j, load(de + j) + (c0 * y0 + c1 * y1) + (c2 * y2 + c3 * y3));
    }
    float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
    for (int64_t j = vec_end; j < v; ++j) {
      s0 += g0[j] * e[j];
      s1 += g1[j] * e[j];
      s2 += g2[j] * e[j];
      s3 += g3[j] * e[j];
      de[j] += (c0[0] * g0[j] + c1[0] * g1[j]) + (c2[0] * g2[j] + c3[0] * g3[j]);
    }
    const float sums[kBlock] = {s0, s1, s2, s3};
    for (int64_t i = 0; i < nr; ++i) p.dh[(r0 + i) * d + k] = sums[i];
  }
}

// Rows [begin, end) of `p`, with scratch rows of p.cols floats. With the
// gradient, `colsum` [cols] (and from hidden states `det` [dim, cols])
// accumulate this worker's share.
void RunRows(const Params& p, int64_t begin, int64_t end, float* colsum, float* det) {
  const int64_t v = p.cols;
  const int64_t vec_end = v - v % kLanes;
  const bool teacher = p.t != nullptr;
  const bool unit = p.temperature == 1.0f;
  const float inv_t = 1.0f / p.temperature;
  std::vector<float> buf_a(teacher ? v : 0), buf_b(v), buf_z(unit ? 0 : v);
  float* ea = buf_a.data();
  float* eb = buf_b.data();
  float* ez = unit ? eb : buf_z.data();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // The biases, with the padding column masked (adding -inf to it).
  // From hidden states, the student's bias is in the computed logits and
  // bias_s keeps only the padding column's mask.
  const bool fused = p.s == nullptr;
  std::vector<float> bias_s(p.s_bias, p.s_bias + v);
  std::vector<float> bias_t(teacher ? p.t_bias : p.s_bias, (teacher ? p.t_bias : p.s_bias) + v);
  if (fused) std::fill(bias_s.begin(), bias_s.end(), 0.0f);
  if (p.mask_first && p.col_offset == 0 && v > 0) bias_s[0] = bias_t[0] = neg_inf;
  for (int64_t j = std::max<int64_t>(0, p.valid_cols - p.col_offset); j < v; ++j) {
    bias_s[j] = bias_t[j] = neg_inf;
  }
  float* bs = bias_s.data();
  float* bt = bias_t.data();
  std::vector<float> saved(2 * p.num_seen);
  std::vector<float> block(fused ? kBlock * v : 0);
  std::vector<vf> hb(fused ? kBlock * p.dim : 0);
  // From hidden states, each row's gradient overwrites its logits in `block`
  // (pass 3 reads only the exponentials), and the block's backward products
  // run once its rows are done.
  const bool want_grad = fused ? p.dh != nullptr : p.grad != nullptr;
  const float inv_k = 1.0f / static_cast<float>(p.num_labels);

  // The mean of the row's label logits (ce's second term); NaN if a label is
  // out of range.
  // The sum of the row's label logits in this block and their count.
  auto label_sum = [&](int64_t r, const float* s, int64_t& count) {
    const int32_t* y = p.labels + r * p.num_labels;
    float sum = 0.0f;
    count = 0;
    for (int64_t k = 0; k < p.num_labels; ++k) {
      const int64_t j = y[k] - p.col_offset;
      if (j < 0 || j >= v) continue;
      sum += s[j] + bs[j];
      ++count;
    }
    return sum;
  };
  // The mean of the row's label logits (ce's second term); NaN, and
  // `in_range` false, if a label is not an item of the block.
  auto label_mean = [&](int64_t r, const float* s, bool& in_range) {
    int64_t count = 0;
    const float sum = label_sum(r, s, count);
    in_range = count == p.num_labels;
    return in_range ? sum * inv_k : std::numeric_limits<float>::quiet_NaN();
  };
  // g -= w / K at each label in the block; with `whole` (one pass over the
  // whole catalogue), NaN everywhere if a label is out of range.
  auto subtract_labels = [&](int64_t r, float* g, float w, bool in_range, bool whole) {
    if (w == 0.0f) return;
    if (whole && !in_range) {
      std::fill(g, g + v, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    const int32_t* y = p.labels + r * p.num_labels;
    for (int64_t k = 0; k < p.num_labels; ++k) {
      const int64_t j = y[k] - p.col_offset;
      if (j >= 0 && j < v) g[j] -= w * inv_k;
    }
  };
  // Two-phase mode: a row's statistics over the block, written out.
  auto write_stats = [&](int64_t r, const float* s, float max_s, float sum_z, float sum_b,
                         float max_t, float sum_a, float cross) {
    int64_t count = 0;
    const float lab = label_sum(r, s, count);
    float* out = p.stats_out + r * kStats;
    const float row[kStats] = {max_s, sum_z, sum_b, max_t, sum_a, cross, lab,
                               static_cast<float>(count)};
    std::copy(row, row + kStats, out);
  };
  const bool whole = p.stats_in == nullptr;
  auto add_colsum = [&](const float* g) {
    int64_t j = 0;
    for (; j < vec_end; j += kLanes) store(colsum + j, load(colsum + j) + load(g + j));
    for (; j < v; ++j) colsum[j] += g[j];
  };

  // Cross-entropy alone: two passes over the row (maxima, exponentials), and
  // the gradient from the row buffer.
  auto ce_row = [&](int64_t r, const float* s, float* g) {
    const float* given = whole ? nullptr : p.stats_in + r * kStats;
    float max_s = given ? given[0] : neg_inf;
    int64_t j = 0;
    if (!given) {
      vf m0 = splat(neg_inf), m1 = m0;
      for (; j + 2 * kLanes <= vec_end; j += 2 * kLanes) {
        const vf a0 = load(s + j) + load(bs + j);
        const vf a1 = load(s + j + kLanes) + load(bs + j + kLanes);
        m0 = a0 > m0 ? a0 : m0;
        m1 = a1 > m1 ? a1 : m1;
      }
      max_s = std::max(hmax(m0), hmax(m1));
      for (; j < v; ++j) {
        const float sj = s[j] + bs[j];
        max_s = sj > max_s ? sj : max_s;
      }
    }
    vf acc = splat(0.0f);
    const vf vmax = splat(max_s);
    for (j = 0; j < vec_end; j += kLanes) {
      const vf e = exp_nonpos(load(s + j) + load(bs + j) - vmax);
      store(eb + j, e);
      acc += e;
    }
    float sum = hsum(acc);
    for (; j < v; ++j) {
      eb[j] = exp_nonpos(s[j] + bs[j] - max_s);
      sum += eb[j];
    }
    if (p.stats_out != nullptr) {
      write_stats(r, s, max_s, sum, sum, 0.0f, 0.0f, 0.0f);
      return;
    }
    const bool has_label = p.labelled[r] != 0.0f;
    bool in_range = true;
    if (given) {
      sum = given[1];
    } else {
      p.ce[r] = has_label ? std::log(sum) + (max_s - label_mean(r, s, in_range)) : 0.0f;
      if (p.kl != nullptr) p.kl[r] = 0.0f;
    }
    if (g == nullptr) return;
    const float w = has_label ? p.alpha : 0.0f;
    const vf c = splat(w / sum);
    for (j = 0; j < vec_end; j += kLanes) store(g + j, c * load(eb + j));
    for (; j < v; ++j) g[j] = c[0] * eb[j];
    subtract_labels(r, g, w, in_range, whole);
  };

  // The distillation loss: student and teacher together.
  auto distill_row = [&](int64_t r, const float* s, float* g) {
    const float* t = p.t + r * v;
    const float* given = whole ? nullptr : p.stats_in + r * kStats;
    // Pass 1: row maxima (reads the row from memory; it stays in cache).
    float max_s = given ? given[0] : neg_inf, max_t = given ? given[3] : neg_inf;
    int64_t j = 0;
    if (!given) {
      vf ms0 = splat(neg_inf), ms1 = ms0, mt0 = ms0, mt1 = ms0;
      for (; j + 2 * kLanes <= vec_end; j += 2 * kLanes) {
        vf a0 = load(s + j) + load(bs + j), a1 = load(s + j + kLanes) + load(bs + j + kLanes);
        vf b0 = load(t + j) + load(bt + j), b1 = load(t + j + kLanes) + load(bt + j + kLanes);
        ms0 = a0 > ms0 ? a0 : ms0;
        ms1 = a1 > ms1 ? a1 : ms1;
        mt0 = b0 > mt0 ? b0 : mt0;
        mt1 = b1 > mt1 ? b1 : mt1;
      }
      max_s = std::max(hmax(ms0), hmax(ms1));
      max_t = std::max(hmax(mt0), hmax(mt1));
      for (; j < v; ++j) {
        const float sj = s[j] + bs[j], tj = t[j] + bt[j];
        max_s = sj > max_s ? sj : max_s;
        max_t = tj > max_t ? tj : max_t;
      }
    }
    // Pass 2: exponentials into the row buffers, their sums, and the KL's
    // cross term sum_j e^a_j (a_j - b_j) with a = (t - max_t)/T and
    // b = (s - max_s)/T (0 where e^a_j == 0, so -inf - -inf adds nothing).
    vf sa = splat(0.0f), sb = sa, sz = sa, cross = sa;
    const vf vmax_s = splat(max_s), vmax_t = splat(max_t), vinv_t = splat(inv_t);
    for (j = 0; j < vec_end; j += kLanes) {
      vf zs = load(s + j) + load(bs + j) - vmax_s;
      vf ta = load(t + j) + load(bt + j) - vmax_t;
      vf a = unit ? ta : ta * vinv_t;
      vf b = unit ? zs : zs * vinv_t;
      vf e_a = exp_nonpos(a);
      vf e_b = exp_nonpos(b);
      store(ea + j, e_a);
      store(eb + j, e_b);
      sa += e_a;
      sb += e_b;
      cross += e_a > splat(0.0f) ? e_a * (a - b) : splat(0.0f);
      if (!unit) {
        vf e_z = exp_nonpos(zs);
        store(ez + j, e_z);
        sz += e_z;
      }
    }
    float sum_a = hsum(sa), sum_b = hsum(sb), sum_z = hsum(sz), cr = hsum(cross);
    for (; j < v; ++j) {
      float zs = s[j] + bs[j] - max_s;
      float a = unit ? t[j] + bt[j] - max_t : (t[j] + bt[j] - max_t) * inv_t;
      float b = unit ? zs : zs * inv_t;
      float e_a = exp_nonpos(a), e_b = exp_nonpos(b);
      ea[j] = e_a;
      eb[j] = e_b;
      sum_a += e_a;
      sum_b += e_b;
      cr += e_a > 0.0f ? e_a * (a - b) : 0.0f;
      if (!unit) {
        float e_z = exp_nonpos(zs);
        ez[j] = e_z;
        sum_z += e_z;
      }
    }
    if (unit) sum_z = sum_b;
    if (p.stats_out != nullptr) {
      write_stats(r, s, max_s, sum_z, sum_b, max_t, sum_a, cr);
      return;
    }
    const bool has_label = p.labelled[r] != 0.0f;
    bool in_range = true;
    if (given) {
      sum_z = given[1];
      sum_b = given[2];
      sum_a = given[4];
    } else {
      p.kl[r] = cr / sum_a - std::log(sum_a) + std::log(sum_b);
      p.ce[r] = has_label ? std::log(sum_z) + (max_s - label_mean(r, s, in_range)) : 0.0f;
    }
    if (g == nullptr) return;
    // Pass 3: the gradient, from the row buffers.
    const float w_ce = has_label ? p.alpha : 0.0f;
    const float w_kd = (1.0f - p.alpha) * p.temperature;
    const vf cz = splat(w_ce / sum_z), cb = splat(w_kd / sum_b), ca = splat(w_kd / sum_a);
    if (unit) {
      const vf cq = splat(w_ce / sum_z + w_kd / sum_b);
      for (j = 0; j < vec_end; j += kLanes) {
        store(g + j, cq * load(eb + j) - ca * load(ea + j));
      }
    } else {
      for (j = 0; j < vec_end; j += kLanes) {
        store(g + j, cz * load(ez + j) + cb * load(eb + j) - ca * load(ea + j));
      }
    }
    for (; j < v; ++j) {
      g[j] = cz[0] * ez[j] + cb[0] * eb[j] - ca[0] * ea[j];
    }
    subtract_labels(r, g, w_ce, in_range, whole);
  };

  auto row = [&](int64_t r, float* block_row) {
    const float* s = fused ? block_row : p.s + r * v;
    float* g = !want_grad ? nullptr : fused ? block_row : p.grad + r * v;
    if (p.valid[r] == 0.0f) {
      if (p.ce != nullptr) p.ce[r] = 0.0f;
      if (p.kl != nullptr) p.kl[r] = 0.0f;
      if (p.stats_out != nullptr) {
        // Finite statistics that combine to nothing: the caller drops the row.
        const float none[kStats] = {0.0f, 1.0f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0.0f};
        std::copy(none, none + kStats, p.stats_out + r * kStats);
      }
      if (g != nullptr) std::fill(g, g + v, 0.0f);
      return;
    }
    // exclude_history: the seen columns are -inf for this row alone.
    const int32_t* seen = p.seen + r * p.num_seen;
    for (int64_t k = 0; k < p.num_seen; ++k) {
      const int64_t c = seen[k] - p.col_offset;
      if (seen[k] <= 0 || c < 0 || c >= v) continue;
      saved[2 * k] = bs[c];
      saved[2 * k + 1] = bt[c];
      bs[c] = bt[c] = neg_inf;
    }
    if (teacher) {
      distill_row(r, s, g);
    } else {
      ce_row(r, s, g);
    }
    // Restored in reverse, so a column listed twice gets its own value back.
    for (int64_t k = p.num_seen - 1; k >= 0; --k) {
      const int64_t c = seen[k] - p.col_offset;
      if (seen[k] <= 0 || c < 0 || c >= v) continue;
      bs[c] = saved[2 * k];
      bt[c] = saved[2 * k + 1];
    }
    // Logits given: the row is still in cache, add it to this thread's
    // column sums (from hidden states: in BlockBackward).
    if (g != nullptr && !fused) add_colsum(g);
  };
  if (!fused) {
    for (int64_t r = begin; r < end; ++r) row(r, nullptr);
    return;
  }
  for (int64_t r0 = begin; r0 < end; r0 += kBlock) {
    const int64_t nr = std::min<int64_t>(kBlock, end - r0);
    StudentLogits(p, r0, nr, hb.data(), block.data());
    for (int64_t i = 0; i < nr; ++i) row(r0 + i, block.data() + i * v);
    if (!want_grad) continue;
    std::fill(block.begin() + nr * v, block.end(), 0.0f);
    // Masked rows add nothing, whatever their hidden states hold.
    for (int64_t i = 0; i < nr; ++i) {
      if (p.valid[r0 + i] == 0.0f) {
        std::fill(hb.begin() + i * p.dim, hb.begin() + (i + 1) * p.dim, splat(0.0f));
      }
    }
    BlockBackward(p, r0, nr, hb.data(), block.data(), det, colsum);
  }
}

// Work shared by the calling thread and the tasks it schedules on XLA's own
// CPU thread pool (the one its matrix multiplies use, so the kernel does not
// compete with idle-spinning pool threads for the cores). Rows go out in
// chunks from an atomic counter: a task that starts late, or runs inline in
// the caller, finds the chunks taken and returns without touching the
// arrays. The state is reference counted because a late task may start after
// the call has returned.
//
// The gradient's sums over rows (column sums, det) are accumulated per chunk,
// not per thread, and added up in chunk order: which thread takes which chunk
// varies from call to call, and the result must not (a resumed run repeats
// an uninterrupted one bit for bit).
struct Shared {
  Params p;
  bool grad = false;
  int64_t chunk_rows = 0;
  int64_t chunks = 0;
  std::atomic<int64_t> next_chunk{0};
  std::vector<std::vector<float>> partial;  // per chunk column sums (gradient only)
  std::vector<std::vector<float>> partial_det;  // per chunk det (from hidden states)
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;
};

void Work(Shared& st) {
  for (;;) {
    const int64_t c = st.next_chunk.fetch_add(1);
    if (c >= st.chunks) return;
    float* colsum = nullptr;
    float* det = nullptr;
    if (st.grad) {
      st.partial[c].assign(st.p.cols, 0.0f);
      colsum = st.partial[c].data();
      if (st.p.dh != nullptr) {
        st.partial_det[c].assign(st.p.dim * st.p.cols, 0.0f);
        det = st.partial_det[c].data();
      }
    }
    const int64_t begin = c * st.chunk_rows;
    RunRows(st.p, begin, std::min(st.p.rows, begin + st.chunk_rows), colsum, det);
    std::lock_guard<std::mutex> lock(st.mu);
    if (++st.done == st.chunks) st.cv.notify_all();
  }
}

// Runs the rows on the caller and `pool.num_threads() - 1` pool tasks, so
// that as many threads work as the pool has (one per core: more would only
// take turns on the cores); 16 rows per chunk at least, about two chunks per
// worker. Writes the gradient's column sums to `colsum` when given, and from
// hidden states its product with h to `det` [dim, cols].
void Run(const Params& p, float* colsum, float* det, ffi::ThreadPool& pool) {
  auto st = std::make_shared<Shared>();
  st->p = p;
  st->grad = colsum != nullptr;
  int64_t helpers = std::max<int64_t>(0, pool.num_threads() - 1);
  int64_t most_chunks = 2 * (helpers + 1);
  if (det != nullptr) {
    // Each chunk accumulates its own det [dim, cols]: keep them within 256 MB
    // together (a 10^6-item catalogue at dim 64 is 256 MB per chunk).
    const int64_t per_chunk = std::max<int64_t>(1, p.dim * p.cols * 4);
    const int64_t fit = std::max<int64_t>(1, (int64_t{1} << 28) / per_chunk);
    most_chunks = std::min(most_chunks, fit);
    helpers = std::min(helpers, fit - 1);
  }
  st->chunk_rows = std::max<int64_t>(16, (p.rows + most_chunks - 1) / most_chunks);
  st->chunks = (p.rows + st->chunk_rows - 1) / st->chunk_rows;
  if (st->grad) {
    st->partial.resize(st->chunks);
    st->partial_det.resize(st->chunks);
  }
  for (int64_t i = 0; i < std::min(helpers, st->chunks - 1); ++i) {
    pool.Schedule([st] { Work(*st); });
  }
  Work(*st);
  {
    std::unique_lock<std::mutex> lock(st->mu);
    st->cv.wait(lock, [&st] { return st->done == st->chunks; });
  }
  if (colsum == nullptr) return;
  std::fill(colsum, colsum + p.cols, 0.0f);
  for (const auto& part : st->partial) {
    for (int64_t j = 0; j < p.cols; ++j) colsum[j] += part[j];
  }
  if (det == nullptr) return;
  const int64_t n = p.dim * p.cols;
  std::fill(det, det + n, 0.0f);
  for (const auto& part : st->partial_det) {
    for (int64_t j = 0; j < n; ++j) det[j] += part[j];
  }
}

using F32 = ffi::Buffer<ffi::F32>;
using F32Result = ffi::ResultBuffer<ffi::F32>;
using S32 = ffi::Buffer<ffi::S32>;
using Scalar = ffi::BufferR0<ffi::F32>;

ffi::Error Invalid(const char* name, const char* what) {
  return ffi::Error::InvalidArgument(std::string(name) + ": " + what);
}

// Checks the per-row and per-item inputs against [rows, items] and fills the
// parts of Params that every target shares. `t` and `t_bias` are null without
// a teacher; `seen` is null where the target takes none.
ffi::Error Common(const char* name, int64_t rows, int64_t items, F32& s_bias, F32* t, F32* t_bias,
                  S32& labels, S32* seen, F32& valid, F32& labelled, bool mask_first, Params& p) {
  if (t != nullptr) {
    auto dt = t->dimensions();
    if (dt.size() != 2 || dt[0] != rows || dt[1] != items) {
      return Invalid(name, "teacher logits must be [rows, items] like the student's");
    }
    if (t_bias->element_count() != static_cast<size_t>(items)) {
      return Invalid(name, "biases must be [items]");
    }
    p.t = t->typed_data();
    p.t_bias = t_bias->typed_data();
  }
  if (s_bias.element_count() != static_cast<size_t>(items)) {
    return Invalid(name, "biases must be [items]");
  }
  const size_t n = rows;
  if (valid.element_count() != n || labelled.element_count() != n) {
    return Invalid(name, "masks must be [rows]");
  }
  auto dl = labels.dimensions();
  if (dl.size() < 1 || dl.size() > 2 || dl[0] != rows || (dl.size() == 2 && dl[1] < 1)) {
    return Invalid(name, "labels must be [rows] or [rows, k] with k >= 1");
  }
  p.num_labels = dl.size() == 2 ? dl[1] : 1;
  if (seen != nullptr) {
    auto ds = seen->dimensions();
    if (ds.size() != 2 || ds[0] != rows) {
      return Invalid(name, "seen ids must be [rows, s]");
    }
    p.seen = seen->typed_data();
    p.num_seen = ds[1];
  }
  p.s_bias = s_bias.typed_data();
  p.mask_first = mask_first;
  p.labels = labels.typed_data();
  p.valid = valid.typed_data();
  p.labelled = labelled.typed_data();
  p.rows = rows;
  p.cols = items;
  p.valid_cols = items;
  return ffi::Error::Success();
}

// Student logits given: s [rows, items].
ffi::Error DistillRows(ffi::ThreadPool pool, F32 s, F32 s_bias, F32 t, F32 t_bias, S32 labels,
                       F32 valid, F32 labelled, Scalar temperature, Scalar alpha, bool mask_first,
                       F32Result ce, F32Result kl, float* grad, float* bias_grad) {
  auto ds = s.dimensions();
  if (ds.size() != 2) return Invalid("distill_rows", "student logits must be [rows, items]");
  Params p{};
  ffi::Error err = Common("distill_rows", ds[0], ds[1], s_bias, &t, &t_bias, labels, nullptr,
                          valid, labelled, mask_first, p);
  if (err.failure()) return err;
  p.s = s.typed_data();
  p.temperature = *temperature.typed_data();
  p.alpha = *alpha.typed_data();
  p.ce = ce->typed_data();
  p.kl = kl->typed_data();
  p.grad = grad;
  Run(p, bias_grad, nullptr, pool);
  return ffi::Error::Success();
}

// Student logits computed here: h [rows, dim] times et [dim, items]. `t` is
// null for cross-entropy alone (then `kl` too, and T = alpha = 1).
// Two-phase mode (a block of items): `block` gives its first item, how many
// items are real and where the row statistics go or come from.
struct Block {
  int64_t col_offset = 0;
  int64_t valid_cols = -1;  // -1: every column
  float* stats_out = nullptr;
  const float* stats_in = nullptr;
};

ffi::Error RowsHidden(const char* name, ffi::ThreadPool& pool, F32& h, F32& et, F32& s_bias,
                      F32* t, F32* t_bias, S32& labels, S32& seen, F32& valid, F32& labelled,
                      float temperature, float alpha, bool mask_first, float* ce, float* kl,
                      float* dh, float* det, float* bias_grad, const Block& block = Block{}) {
  auto dims_h = h.dimensions();
  auto dims_e = et.dimensions();
  if (dims_h.size() != 2 || dims_e.size() != 2 || dims_e[0] != dims_h[1]) {
    return Invalid(name,
                   "hidden states must be [rows, dim] and the transposed table [dim, items]");
  }
  Params p{};
  ffi::Error err = Common(name, dims_h[0], dims_e[1], s_bias, t, t_bias, labels, &seen, valid,
                          labelled, mask_first, p);
  if (err.failure()) return err;
  p.h = h.typed_data();
  p.et = et.typed_data();
  p.dim = dims_h[1];
  p.temperature = temperature;
  p.alpha = alpha;
  p.ce = ce;
  p.kl = kl;
  p.dh = dh;
  p.col_offset = block.col_offset;
  if (block.valid_cols >= 0) p.valid_cols = block.valid_cols;
  p.stats_out = block.stats_out;
  p.stats_in = block.stats_in;
  Run(p, bias_grad, det, pool);
  return ffi::Error::Success();
}

ffi::Error DistillRowsStats(ffi::ThreadPool pool, F32 s, F32 s_bias, F32 t, F32 t_bias,
                            S32 labels, F32 valid, F32 labelled, Scalar temperature, Scalar alpha,
                            bool mask_first, F32Result ce, F32Result kl) {
  return DistillRows(pool, s, s_bias, t, t_bias, labels, valid, labelled, temperature, alpha,
                     mask_first, ce, kl, nullptr, nullptr);
}

ffi::Error DistillRowsGrad(ffi::ThreadPool pool, F32 s, F32 s_bias, F32 t, F32 t_bias, S32 labels,
                           F32 valid, F32 labelled, Scalar temperature, Scalar alpha,
                           bool mask_first, F32Result ce, F32Result kl, F32Result grad,
                           F32Result bias_grad) {
  return DistillRows(pool, s, s_bias, t, t_bias, labels, valid, labelled, temperature, alpha,
                     mask_first, ce, kl, grad->typed_data(), bias_grad->typed_data());
}

ffi::Error DistillRowsHiddenStats(ffi::ThreadPool pool, F32 h, F32 et, F32 s_bias, F32 t,
                                  F32 t_bias, S32 labels, S32 seen, F32 valid, F32 labelled,
                                  Scalar temperature, Scalar alpha, bool mask_first, F32Result ce,
                                  F32Result kl) {
  return RowsHidden("distill_rows_hidden", pool, h, et, s_bias, &t, &t_bias, labels, seen, valid,
                    labelled, *temperature.typed_data(), *alpha.typed_data(), mask_first,
                    ce->typed_data(), kl->typed_data(), nullptr, nullptr, nullptr);
}

ffi::Error DistillRowsHiddenGrad(ffi::ThreadPool pool, F32 h, F32 et, F32 s_bias, F32 t,
                                 F32 t_bias, S32 labels, S32 seen, F32 valid, F32 labelled,
                                 Scalar temperature, Scalar alpha, bool mask_first, F32Result ce,
                                 F32Result kl, F32Result dh, F32Result det,
                                 F32Result bias_grad) {
  return RowsHidden("distill_rows_hidden", pool, h, et, s_bias, &t, &t_bias, labels, seen, valid,
                    labelled, *temperature.typed_data(), *alpha.typed_data(), mask_first,
                    ce->typed_data(), kl->typed_data(), dh->typed_data(), det->typed_data(),
                    bias_grad->typed_data());
}

// Cross-entropy alone (every valid row is labelled).
ffi::Error CeRowsHiddenStats(ffi::ThreadPool pool, F32 h, F32 et, F32 s_bias, S32 labels,
                             S32 seen, F32 valid, bool mask_first, F32Result ce) {
  return RowsHidden("cross_entropy_rows_hidden", pool, h, et, s_bias, nullptr, nullptr, labels,
                    seen, valid, valid, 1.0f, 1.0f, mask_first, ce->typed_data(), nullptr,
                    nullptr, nullptr, nullptr);
}

ffi::Error CeRowsHiddenGrad(ffi::ThreadPool pool, F32 h, F32 et, F32 s_bias, S32 labels, S32 seen,
                            F32 valid, bool mask_first, F32Result ce, F32Result dh,
                            F32Result det, F32Result bias_grad) {
  return RowsHidden("cross_entropy_rows_hidden", pool, h, et, s_bias, nullptr, nullptr, labels,
                    seen, valid, valid, 1.0f, 1.0f, mask_first, ce->typed_data(), nullptr,
                    dh->typed_data(), det->typed_data(), bias_grad->typed_data());
}

// A block of a vocab-sharded catalogue (two-phase mode): the student's
// table block et [dim, items], its bias; the teacher's logits t [rows, items]
// and bias (ignored, and may be empty, without `teacher`); labels and seen
// ids are items of the whole catalogue, `offset` the block's first.
ffi::Error CheckBlock(const char* name, F32& h, ffi::Span<const int64_t> stats, S32& offset) {
  if (offset.element_count() != 1) return Invalid(name, "offset must be a scalar");
  auto dh = h.dimensions();
  if (dh.size() != 2 || stats.size() != 2 || stats[0] != dh[0] || stats[1] != kStats) {
    return Invalid(name, "row statistics must be [rows, 8]");
  }
  return ffi::Error::Success();
}

ffi::Error BlockStats(ffi::ThreadPool pool, F32 h, F32 et, F32 s_bias, F32 t, F32 t_bias,
                      S32 labels, S32 seen, F32 valid, F32 labelled, Scalar temperature,
                      Scalar alpha, S32 offset, bool mask_first, int64_t valid_cols, bool teacher,
                      F32Result stats) {
  ffi::Error err = CheckBlock("block_rows_stats", h, stats->dimensions(), offset);
  if (err.failure()) return err;
  Block block{*offset.typed_data(), valid_cols, stats->typed_data(), nullptr};
  return RowsHidden("block_rows_stats", pool, h, et, s_bias, teacher ? &t : nullptr,
                    teacher ? &t_bias : nullptr, labels, seen, valid, labelled,
                    *temperature.typed_data(), *alpha.typed_data(), mask_first, nullptr,
                    nullptr, nullptr, nullptr, nullptr, block);
}

ffi::Error BlockGrad(ffi::ThreadPool pool, F32 h, F32 et, F32 s_bias, F32 t, F32 t_bias,
                     S32 labels, S32 seen, F32 valid, F32 labelled, Scalar temperature,
                     Scalar alpha, S32 offset, F32 stats, bool mask_first, int64_t valid_cols,
                     bool teacher, F32Result dh, F32Result det, F32Result bias_grad) {
  ffi::Error err = CheckBlock("block_rows_grad", h, stats.dimensions(), offset);
  if (err.failure()) return err;
  Block block{*offset.typed_data(), valid_cols, nullptr, stats.typed_data()};
  return RowsHidden("block_rows_grad", pool, h, et, s_bias, teacher ? &t : nullptr,
                    teacher ? &t_bias : nullptr, labels, seen, valid, labelled,
                    *temperature.typed_data(), *alpha.typed_data(), mask_first, nullptr,
                    nullptr, dh->typed_data(), det->typed_data(), bias_grad->typed_data(), block);
}

}  // namespace

// Built with -fvisibility=hidden: only these symbols are exported.
#define DISTILL_ROWS_EXPORT(name)                                              \
  extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* name( \
      XLA_FFI_CallFrame* call_frame);
DISTILL_ROWS_EXPORT(DistillJaxDistillRowsStats)
DISTILL_ROWS_EXPORT(DistillJaxDistillRowsGrad)
DISTILL_ROWS_EXPORT(DistillJaxDistillRowsHiddenStats)
DISTILL_ROWS_EXPORT(DistillJaxDistillRowsHiddenGrad)
DISTILL_ROWS_EXPORT(DistillJaxCeRowsHiddenStats)
DISTILL_ROWS_EXPORT(DistillJaxCeRowsHiddenGrad)
DISTILL_ROWS_EXPORT(DistillJaxBlockRowsStats)
DISTILL_ROWS_EXPORT(DistillJaxBlockRowsGrad)

// Arguments after the student's own (its logits, or its hidden states and
// transposed table): s_bias, t, t_bias, labels, [seen,] valid, labelled, T, alpha.
#define DISTILL_ROWS_TAIL(seen, extra) \
  .Arg<F32>()                          \
      .Arg<F32>()                      \
      .Arg<F32>()                      \
      .Arg<S32>() seen                 \
      .Arg<F32>()                      \
      .Arg<F32>()                      \
      .Arg<Scalar>()                   \
      .Arg<Scalar>()                   \
      .Attr<bool>("mask_first")        \
      .Ret<F32>()                      \
      .Ret<F32>() extra

#define GRAD_RETS .Ret<F32>().Ret<F32>()
#define SEEN .Arg<S32>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(DistillJaxDistillRowsStats, DistillRowsStats,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>()
                                  DISTILL_ROWS_TAIL(, ));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DistillJaxDistillRowsGrad, DistillRowsGrad,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>()
                                  DISTILL_ROWS_TAIL(, GRAD_RETS));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DistillJaxDistillRowsHiddenStats, DistillRowsHiddenStats,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>() DISTILL_ROWS_TAIL(SEEN, ));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DistillJaxDistillRowsHiddenGrad, DistillRowsHiddenGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>() DISTILL_ROWS_TAIL(SEEN, .Ret<F32>() GRAD_RETS));

// Cross-entropy: h, et, s_bias, labels, seen, valid; ce [, dh, det, bias_grad].
#define CE_ROWS_ARGS                                                                          \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<S32>().Arg<S32>() \
      .Arg<F32>()                                                                             \
      .Attr<bool>("mask_first")                                                               \
      .Ret<F32>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(DistillJaxCeRowsHiddenStats, CeRowsHiddenStats, CE_ROWS_ARGS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DistillJaxCeRowsHiddenGrad, CeRowsHiddenGrad,
                              CE_ROWS_ARGS.Ret<F32>() GRAD_RETS);

// A block of items: h, et, s_bias, t, t_bias, labels, seen, valid, labelled,
// T, alpha, offset [, stats]; attributes mask_first, valid_cols, teacher.
#define BLOCK_ROWS_ARGS                                                                        \
  ffi::Ffi::Bind()                                                                             \
      .Ctx<ffi::ThreadPool>()                                                                  \
      .Arg<F32>()                                                                              \
      .Arg<F32>()                                                                              \
      .Arg<F32>()                                                                              \
      .Arg<F32>()                                                                              \
      .Arg<F32>()                                                                              \
      .Arg<S32>()                                                                              \
      .Arg<S32>()                                                                              \
      .Arg<F32>()                                                                              \
      .Arg<F32>()                                                                              \
      .Arg<Scalar>()                                                                           \
      .Arg<Scalar>()                                                                           \
      .Arg<S32>()
#define BLOCK_ROWS_ATTRS \
  .Attr<bool>("mask_first").Attr<int64_t>("valid_cols").Attr<bool>("teacher")

XLA_FFI_DEFINE_HANDLER_SYMBOL(DistillJaxBlockRowsStats, BlockStats,
                              BLOCK_ROWS_ARGS BLOCK_ROWS_ATTRS.Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DistillJaxBlockRowsGrad, BlockGrad,
                              BLOCK_ROWS_ARGS.Arg<F32>() BLOCK_ROWS_ATTRS.Ret<F32>() GRAD_RETS);
