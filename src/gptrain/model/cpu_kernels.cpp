// gptrain's own fp32 CPU kernels, built at first use by model/cpu_kernels.py: causal self-attention forward and
// backward (model/cpu_attention.py), the tanh GELU forward and backward (model/cpu_gelu.py) and a transpose
// (model/cpu_linear.py).
//
// Plain C++ with GCC's vector extensions (16 floats, one AVX-512 register; 8 elsewhere), threaded with
// OpenMP; every output element is computed by one thread in a fixed order, so results do not depend on the
// thread count and are the same on every run.
//
// Attention: OpenMP over (batch, head) pairs. It reads q, k and v straight from the qkv projection's output
// (B, T, 3C) and writes y as (B, T, C) and the gradient as (B, T, 3C), the layouts the linears around it use,
// so no transposes or concatenations are needed around it. Forward, per head: S = Q K^T (K transposed once
// per head, so each FMA covers 16 keys), a causal softmax per row with its log-sum-exp saved, Y = P V.
// Backward recomputes P from the log-sum-exp (as flash attention does): dP = dY V^T, dS = P (dP - rowsum(dY * Y)),
// dQ = dS K per block of query rows, then dK = dS^T Q and dV = P^T dY per chunk of CHUNK query rows.
// Query rows go in blocks of R (8), so every key vector loaded feeds R FMAs.
//
// GELU: GPT-2's 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), computed as x * sigmoid(2u) (the same
// function), the backward from x alone.
//
// Transpose: a contiguous copy of a matrix's transpose (model/cpu_linear.py: oneDNN's strided operands), in 8 x 8
// register blocks, 3-5x ATen's copy on 2 cores; the attention gathers K and V transposed with the same blocks.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// Blocks of R query rows against KB key vectors (S = Q K^T) or DB head-dim vectors (Y = P V): R * KB and R * DB
// accumulators in registers, each vector loaded feeding R FMAs. Chosen by timing on a 2-core Zen 5 (R = 8
// against 4: the default job's attention 0.48 of SDPA's time against 0.61; AVX2 code run there: 0.55 against 0.89).
#ifdef __AVX512F__
static constexpr int W = 16;  // floats per vector: one AVX-512 register (32 of them)
static constexpr int R = 8;
static constexpr int KB = 2;
static constexpr int DB = 2;
#else
static constexpr int W = 8;  // one AVX2 register, 16 of them (GCC splits 16-float vectors into slow code here)
static constexpr int R = 8;
static constexpr int KB = 1;
static constexpr int DB = 1;
#endif
typedef float vec __attribute__((vector_size(4 * W)));
typedef float vecu __attribute__((vector_size(4 * W), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(4 * W)));

static inline vec load(const float* p) { return *(const vecu*)p; }
static inline void store(float* p, vec x) { *(vecu*)p = x; }
static inline vec splat(float x) { return vec{} + x; }

// e^x (Cephes' expf polynomial, about 1 ulp), x clamped to [-87, 88].
static inline vec vexp(vec x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  const vec shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vec t = x * 1.44269504088896341f + shifter;
  vec n = t - shifter;
  ivec ni = (ivec)t - (ivec)shifter;
  vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * (vec)((ni + 127) << 23);
}

static inline float hsum(vec x) {
  float s = 0.0f;
  for (int i = 0; i < W; i++) s += x[i];
  return s;
}

// out[r][j] = sum_d rows[r][d] * colsT[d][j] for j < nv * W; row r starts at rows[r], colsT is D x ldc.
static void rows_times_cols(const float* const* rows, const float* colsT, int D, int ldc, int nv, float* out,
                            int ldo) {
  for (int j0 = 0; j0 < nv; j0 += KB) {
    int nb = std::min(KB, nv - j0);
    vec acc[R][KB] = {};
    for (int d = 0; d < D; d++) {
      const float* c = colsT + (int64_t)d * ldc + j0 * W;
      for (int b = 0; b < KB; b++) {
        if (b >= nb) break;
        vec cv = load(c + b * W);
        for (int r = 0; r < R; r++) acc[r][b] += rows[r][d] * cv;
      }
    }
    for (int r = 0; r < R; r++)
      for (int b = 0; b < nb; b++) store(out + r * ldo + (j0 + b) * W, acc[r][b]);
  }
}

// out[r][:] (+)= scale[r] * sum_{lo <= i < hi} p(r, i) * m[i][:], with p(r, i) = p[r * pr + i * pi] and m's rows
// ldm apart: Y = P V and dQ = dS K over a block of query rows (pr = row length, pi = 1), and dK = dS^T Q,
// dV = P^T dY over a block of keys (pr = 1, pi = row length). out's rows are D apart.
static void probs_times_rows(const float* p, int64_t pr, int64_t pi, const float* m, int64_t ldm, int D, int lo,
                             int hi, const float* scale, bool accumulate, float* out) {
  int dv = D / W;
  for (int d0 = 0; d0 < dv; d0 += DB) {
    int nb = std::min(DB, dv - d0);
    vec acc[R][DB] = {};
    for (int i = lo; i < hi; i++) {
      const float* mi = m + i * ldm + d0 * W;
      const float* pcol = p + i * pi;
      for (int b = 0; b < DB; b++) {
        if (b >= nb) break;
        vec mv = load(mi + b * W);
        for (int r = 0; r < R; r++) acc[r][b] += pcol[r * pr] * mv;
      }
    }
    for (int r = 0; r < R; r++)
      for (int b = 0; b < nb; b++) {
        float* o = out + r * D + (d0 + b) * W;
        vec x = acc[r][b] * scale[r];
        store(o, accumulate ? load(o) + x : x);
      }
  }
}

// 8 x 8 blocks for the transpose, in 8-float vectors whatever W is (both builds have them).
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
typedef int32_t iv8 __attribute__((vector_size(32)));
#ifdef __clang__
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (iv8){__VA_ARGS__})
#endif

// d[j * ldd + i] = s[i * lds + j] for i, j < 8: unpack pairs, then quads, then halves.
static inline void transpose_8x8(const float* s, int64_t lds, float* d, int64_t ldd) {
  v8 r[8], t[8], u[8];
  for (int i = 0; i < 8; i++) r[i] = *(const v8u*)(s + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = SHUFFLE(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = SHUFFLE(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int j = 0; j < 2; j++) {
      u[i + 2 * j] = SHUFFLE(t[i + j], t[i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * j + 1] = SHUFFLE(t[i + j], t[i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int i = 0; i < 4; i++) {
    *(v8u*)(d + i * ldd) = SHUFFLE(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    *(v8u*)(d + (i + 4) * ldd) = SHUFFLE(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// The head's K (or V) as D x Tp, transposed (8 x 8 blocks; D is a multiple of 16) and zero-padded to Tp keys.
static void gather_transposed(const float* base, int64_t st, int T, int D, int Tp, float* outT) {
  int T8 = T / 8 * 8;
  for (int j = 0; j < T8; j += 8)
    for (int d = 0; d < D; d += 8) transpose_8x8(base + j * st + d, st, outT + (int64_t)d * Tp + j, Tp);
  for (int j = T8; j < T; j++)
    for (int d = 0; d < D; d++) outT[(int64_t)d * Tp + j] = base[j * st + d];
  for (int d = 0; d < D; d++)
    for (int j = T; j < Tp; j++) outT[(int64_t)d * Tp + j] = 0.0f;
}

// Pointers to rows first..first+R-1 of a (T, D) slice whose rows are st apart; rows past n read zeros.
static void row_pointers(const float* base, int64_t st, int first, int n, const float* zeros, const float** rows) {
  for (int r = 0; r < R; r++) rows[r] = r < n ? base + (first + r) * st : zeros;
}

static ivec iota() {
  ivec x;
  for (int i = 0; i < W; i++) x[i] = i;
  return x;
}
static const ivec IOTA = iota();

// p[r][j] = exp(scale * s[r][j] - shift[r]) for keys j <= first + r, else 0 (over nv * W keys).
static void causal_exp(float* s, int ld, int first, int nv, float scale, const float* shift) {
  for (int r = 0; r < R; r++) {
    for (int j = 0; j < nv; j++) {
      vec x = vexp(load(s + r * ld + j * W) * scale - shift[r]);
      ivec keep = (IOTA + j * W) <= (first + r);
      store(s + r * ld + j * W, keep ? x : vec{});
    }
  }
}

// The max of s[r][j] over keys j <= last (s has at least last + 1 entries, in whole vectors).
static float causal_max(const float* s, int last) {
  vec m = splat(-INFINITY);
  for (int j = 0; j * W <= last; j++) {
    vec x = load(s + j * W);
    ivec keep = (IOTA + j * W) <= last;
    m = keep && x > m ? x : m;
  }
  float out = m[0];
  for (int i = 1; i < W; i++) out = std::max(out, m[i]);
  return out;
}

static const float GELU_2C = 1.5957691216057308f;  // 2 sqrt(2/pi): sigmoid(2u) = sigmoid(x (2C + 2C a x^2))
static const float GELU_2CA = GELU_2C * 0.044715f;

// x * sigmoid(2u) and its slope s + x s (1 - s) (2C + 6C a x^2), with 1 - s = e s, e = exp(-2u) (exact where s ~ 1).
static inline vec gelu(vec x) { return x / (1.0f + vexp(-x * (GELU_2C + GELU_2CA * x * x))); }
static inline vec gelu_slope(vec x) {
  vec e = vexp(-x * (GELU_2C + GELU_2CA * x * x));
  vec s = 1.0f / (1.0f + e);
  return s + x * (e * s * s) * (GELU_2C + 3.0f * GELU_2CA * x * x);
}

// A tail shorter than a vector, through one vector's worth of stack.
static inline vec load_tail(const float* p, int64_t n) {
  float buf[W] = {};
  std::memcpy(buf, p, sizeof(float) * n);
  return load(buf);
}
static inline void store_tail(float* p, vec x, int64_t n) {
  float buf[W];
  store(buf, x);
  std::memcpy(p, buf, sizeof(float) * n);
}

struct Layout {  // one (B, T, n * C) tensor: element (b, t, c) at b * sb + t * st + c
  float* data;
  int64_t sb, st;
  float* at(int b, int h, int D) const { return data + b * sb + (int64_t)h * D; }
};

struct Scratch {
  std::vector<float> buf;
  float* get(size_t n) {
    if (buf.size() < n) buf.resize(n);
    return buf.data();
  }
};
static thread_local Scratch scratch;
static constexpr int CHUNK = 64;  // query rows whose P and dS the backward keeps at once (a multiple of R)

static void forward_head(const Layout& qkv, const Layout& y, float* lse, int b, int h, int T, int C, int D, float scale) {
  int Tp = (T + W - 1) / W * W;
  float* kT = scratch.get((size_t)Tp * D + R * Tp + D);
  float* s = kT + (size_t)Tp * D;
  float* zeros = s + R * Tp;
  std::memset(zeros, 0, sizeof(float) * D);
  const float* qb = qkv.at(b, h, D);
  gather_transposed(qb + C, qkv.st, T, D, Tp, kT);
  for (int i0 = 0; i0 < T; i0 += R) {
    int nr = std::min(R, T - i0), nk = i0 + nr, nv = (nk + W - 1) / W;
    const float* q[R];
    row_pointers(qb, qkv.st, i0, nr, zeros, q);
    rows_times_cols(q, kT, D, Tp, nv, s, Tp);
    float shift[R], inv[R];
    for (int r = 0; r < R; r++) shift[r] = causal_max(s + r * Tp, std::min(i0 + r, T - 1)) * scale;
    causal_exp(s, Tp, i0, nv, scale, shift);
    for (int r = 0; r < R; r++) {
      vec sum = {};
      for (int j = 0; j < nv; j++) sum += load(s + r * Tp + j * W);
      float l = hsum(sum);
      inv[r] = 1.0f / l;
      if (r < nr) lse[i0 + r] = shift[r] + std::log(l);
    }
    float o[R * 256];
    probs_times_rows(s, Tp, 1, qb + 2 * C, qkv.st, D, 0, nk, inv, false, o);
    for (int r = 0; r < nr; r++) std::memcpy(y.at(b, h, D) + (i0 + r) * y.st, o + r * D, sizeof(float) * D);
  }
}

// One block of R query rows: P and dS into p and ds (rows ld apart), dQ into g.
static void backward_rows(const float* qb, int64_t sq, const float* yb, int64_t sy, const float* gyb, int64_t sgy,
                          const float* lse, const float* kT, const float* vT, const float* zeros, int i0, int T, int C,
                          int D, int Tp, float scale, float* p, float* ds, float* gq, int64_t sg) {
  int nr = std::min(R, T - i0), nk = i0 + nr, nv = (nk + W - 1) / W;
  const float *q[R], *dy[R], *o[R];
  row_pointers(qb, sq, i0, nr, zeros, q);
  row_pointers(gyb, sgy, i0, nr, zeros, dy);
  row_pointers(yb, sy, i0, nr, zeros, o);
  float shift[R], rowdot[R], scales[R];
  for (int r = 0; r < R; r++) {
    shift[r] = r < nr ? lse[i0 + r] : 0.0f;
    vec acc = {};
    for (int d = 0; d < D; d += W) acc += load(dy[r] + d) * load(o[r] + d);
    rowdot[r] = hsum(acc);
    scales[r] = scale;
  }
  rows_times_cols(q, kT, D, Tp, nv, p, Tp);
  causal_exp(p, Tp, i0, nv, scale, shift);
  rows_times_cols(dy, vT, D, Tp, nv, ds, Tp);
  for (int r = 0; r < R; r++)
    for (int j = 0; j < nv; j++) {
      vec pv = load(p + r * Tp + j * W);
      store(ds + r * Tp + j * W, pv * (load(ds + r * Tp + j * W) - rowdot[r]));
    }
  float out[R * 256];
  probs_times_rows(ds, Tp, 1, qb + C, sq, D, 0, nk, scales, false, out);
  for (int r = 0; r < nr; r++) std::memcpy(gq + (i0 + r) * sg, out + r * D, sizeof(float) * D);
}

static void backward_head(const Layout& qkv, const Layout& y, const Layout& gy, const float* lse, const Layout& g,
                          int b, int h, int T, int C, int D, float scale) {
  int Tp = (T + W - 1) / W * W, Tr = (T + R - 1) / R * R;
  size_t plane = (size_t)Tp * D;
  float* kT = scratch.get(2 * plane + 2 * (size_t)Tr * D + 2 * (size_t)CHUNK * Tp + D);
  float* vT = kT + plane;
  float* gk = vT + plane;  // Tr x D each: dK and dV accumulated over the query chunks
  float* gv = gk + (size_t)Tr * D;
  float* p = gv + (size_t)Tr * D;  // CHUNK x Tp each
  float* ds = p + (size_t)CHUNK * Tp;
  float* zeros = ds + (size_t)CHUNK * Tp;
  std::memset(zeros, 0, sizeof(float) * D);
  std::memset(gk, 0, sizeof(float) * 2 * Tr * D);
  const float* qb = qkv.at(b, h, D);
  const float* gyb = gy.at(b, h, D);
  gather_transposed(qb + C, qkv.st, T, D, Tp, kT);
  gather_transposed(qb + 2 * C, qkv.st, T, D, Tp, vT);
  float* gq = g.at(b, h, D);
  float ones[R];
  std::fill(ones, ones + R, 1.0f);
  for (int c0 = 0; c0 < T; c0 += CHUNK) {
    int c1 = std::min(T, c0 + CHUNK);
    for (int i0 = c0; i0 < c1; i0 += R)
      backward_rows(qb, qkv.st, y.at(b, h, D), y.st, gyb, gy.st, lse, kT, vT, zeros, i0, T, C, D, Tp, scale,
                    p + (size_t)(i0 - c0) * Tp, ds + (size_t)(i0 - c0) * Tp, gq, g.st);
    // dK[j] += sum_i dS[i][j] q[i], dV[j] += sum_i P[i][j] dy[i] over this chunk's rows i >= j (causal)
    // (only keys j0 <= i: the entries read, P[i][j0..j0+R), lie within the vectors row i computed).
    const float* q_chunk = qb + c0 * qkv.st;
    const float* dy_chunk = gyb + c0 * gy.st;
    for (int j0 = 0; j0 < c1; j0 += R) {
      int lo = std::max(c0, j0) - c0, hi = c1 - c0;
      probs_times_rows(ds + j0, 1, Tp, q_chunk, qkv.st, D, lo, hi, ones, true, gk + (size_t)j0 * D);
      probs_times_rows(p + j0, 1, Tp, dy_chunk, gy.st, D, lo, hi, ones, true, gv + (size_t)j0 * D);
    }
  }
  for (int j = 0; j < T; j++) {
    float* out = gq + j * g.st;
    for (int d = 0; d < D; d += W) {
      store(out + C + d, load(gk + (size_t)j * D + d) * scale);
      store(out + 2 * C + d, load(gv + (size_t)j * D + d));
    }
  }
}

extern "C" {

int gptrain_kernels_abi() { return 3; }

// qkv: (B, T, 3C) with strides (sq_b, sq_t, 1); y: (B, T, C) (sy_b, sy_t, 1); lse: (B, H, T) contiguous.
void gptrain_attention_forward(float* qkv, int64_t sq_b, int64_t sq_t, float* y, int64_t sy_b, int64_t sy_t,
                               float* lse, int B, int T, int H, int D, float scale, int threads) {
  Layout lq{qkv, sq_b, sq_t}, ly{y, sy_b, sy_t};
  int C = H * D;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int bh = 0; bh < B * H; bh++)
    forward_head(lq, ly, lse + (int64_t)bh * T, bh / H, bh % H, T, C, D, scale);
}

// g: the gradient of qkv, (B, T, 3C) with strides (sg_b, sg_t, 1); gy: y's gradient (B, T, C).
void gptrain_attention_backward(float* qkv, int64_t sq_b, int64_t sq_t, float* y, int64_t sy_b, int64_t sy_t,
                                float* gy, int64_t sgy_b, int64_t sgy_t, float* lse, float* g, int64_t sg_b,
                                int64_t sg_t, int B, int T, int H, int D, float scale, int threads) {
  Layout lq{qkv, sq_b, sq_t}, ly{y, sy_b, sy_t}, lgy{gy, sgy_b, sgy_t}, lg{g, sg_b, sg_t};
  int C = H * D;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int bh = 0; bh < B * H; bh++)
    backward_head(lq, ly, lgy, lse + (int64_t)bh * T, lg, bh / H, bh % H, T, C, D, scale);
}

// y = gelu(x) over n contiguous floats.
void gptrain_gelu_forward(float* x, float* y, int64_t n, int threads) {
  int64_t nv = n / W;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < nv; i++) store(y + i * W, gelu(load(x + i * W)));
  if (n > nv * W) store_tail(y + nv * W, gelu(load_tail(x + nv * W, n - nv * W)), n - nv * W);
}

// gx = g * gelu'(x) over n contiguous floats.
void gptrain_gelu_backward(float* x, float* g, float* gx, int64_t n, int threads) {
  int64_t nv = n / W;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < nv; i++) store(gx + i * W, load(g + i * W) * gelu_slope(load(x + i * W)));
  if (n > nv * W) {
    int64_t t = n - nv * W;
    store_tail(gx + nv * W, load_tail(g + nv * W, t) * gelu_slope(load_tail(x + nv * W, t)), t);
  }
}

// dst (cols, rows) = src (rows, cols)^T, both contiguous. Tiles of 16 columns by 32 rows (the fastest of
// 16-128 each way at GPT shapes on a 2-core Zen 5), the threads taking consecutive column tiles, so each
// writes whole rows of dst; the edges that are not full 8 x 8 blocks go element by element.
void gptrain_transpose(float* src, float* dst, int64_t rows, int64_t cols, int threads) {
  const int64_t TC = 16, TR = 32, nc = (cols + TC - 1) / TC, nr = (rows + TR - 1) / TR;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t tile = 0; tile < nc * nr; tile++) {
    int64_t c0 = tile / nr * TC, r0 = tile % nr * TR;
    int64_t c1 = std::min(c0 + TC, cols), r1 = std::min(r0 + TR, rows);
    int64_t c8 = c0 + (c1 - c0) / 8 * 8, r8 = r0 + (r1 - r0) / 8 * 8;
    for (int64_t r = r0; r < r8; r += 8)
      for (int64_t c = c0; c < c8; c += 8) transpose_8x8(src + r * cols + c, cols, dst + c * rows + r, rows);
    for (int64_t c = c0; c < c1; c++)
      for (int64_t r = c < c8 ? r8 : r0; r < r1; r++) dst[c * rows + r] = src[r * cols + c];
  }
}
}
