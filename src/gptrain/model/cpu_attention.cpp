// Causal self-attention for fp32 on the CPU, forward and backward, for model/cpu_attention.py.
//
// Plain C++ with GCC's vector extensions (16 floats: one AVX-512 register, two AVX2 ones), threaded with
// OpenMP over (batch, head) pairs: each pair is one thread's whole job, so the result does not depend on the
// thread count and is the same on every run. It reads q, k and v straight from the qkv projection's output
// (B, T, 3C) and writes y as (B, T, C) and the gradient as (B, T, 3C), the layouts the linears around it use,
// so no transposes or concatenations are needed around it.
//
// Forward, per head: S = Q K^T (K transposed once per head, so each FMA covers 16 keys), a causal softmax
// per row with its log-sum-exp saved, Y = P V. Backward recomputes P from the log-sum-exp (as flash
// attention does): dP = dY V^T, dS = P (dP - rowsum(dY * Y)), dQ = dS K, dK = dS^T Q, dV = P^T dY.
// Query rows go in blocks of 4, so every key vector loaded feeds 4 FMAs.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16 __attribute__((vector_size(64)));

static constexpr int W = 16;  // floats per vector
static constexpr int R = 4;   // query rows per block
#ifdef __AVX512F__
static constexpr int KB = 4;  // key vectors per block in S = Q K^T (R * KB accumulators)
static constexpr int DB = 4;  // head-dim vectors per block in Y = P V
#else
static constexpr int KB = 2;  // AVX2 has 16 registers of 8 floats, half as many floats
static constexpr int DB = 2;
#endif

static inline v16 load(const float* p) { return *(const v16u*)p; }
static inline void store(float* p, v16 x) { *(v16u*)p = x; }
static inline v16 splat(float x) { return v16{} + x; }

// e^x for x <= 0 (Cephes' expf polynomial, about 1 ulp); x below -87 gives about e^-87.
static inline v16 vexp(v16 x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  const v16 shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  v16 t = x * 1.44269504088896341f + shifter;
  v16 n = t - shifter;
  i16 ni = (i16)t - (i16)shifter;
  v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * (v16)((ni + 127) << 23);
}

static inline float hsum(v16 x) {
  float s = 0.0f;
  for (int i = 0; i < W; i++) s += x[i];
  return s;
}

// out[r][j] = sum_d rows[r][d] * colsT[d][j] for j < nv * W; rows is R x D, colsT is D x ldc.
static void rows_times_cols(const float* rows, const float* colsT, int D, int ldc, int nv, float* out, int ldo) {
  for (int j0 = 0; j0 < nv; j0 += KB) {
    int nb = std::min(KB, nv - j0);
    v16 acc[R][KB] = {};
    for (int d = 0; d < D; d++) {
      const float* c = colsT + (int64_t)d * ldc + j0 * W;
      for (int b = 0; b < KB; b++) {
        if (b >= nb) break;
        v16 cv = load(c + b * W);
        for (int r = 0; r < R; r++) acc[r][b] += rows[r * D + d] * cv;
      }
    }
    for (int r = 0; r < R; r++)
      for (int b = 0; b < nb; b++) store(out + r * ldo + (j0 + b) * W, acc[r][b]);
  }
}

// out[r][:] = sum_{j < n} p[r][j] * m[j][:] (m is n x D, row stride D), scaled by scale[r].
static void probs_times_rows(const float* p, int ldp, const float* m, int D, int n, const float* scale, float* out) {
  int dv = D / W;
  for (int d0 = 0; d0 < dv; d0 += DB) {
    int nb = std::min(DB, dv - d0);
    v16 acc[R][DB] = {};
    for (int j = 0; j < n; j++) {
      const float* mj = m + (int64_t)j * D + d0 * W;
      for (int b = 0; b < DB; b++) {
        if (b >= nb) break;
        v16 mv = load(mj + b * W);
        for (int r = 0; r < R; r++) acc[r][b] += p[r * ldp + j] * mv;
      }
    }
    for (int r = 0; r < R; r++)
      for (int b = 0; b < nb; b++) store(out + r * D + (d0 + b) * W, acc[r][b] * scale[r]);
  }
}

// accT[d][j] += sum_r rows[r][d] * p[r][j] for j < nv * W (rows R x D, p R x ldp, accT D x lda).
static void add_outer(const float* rows, int D, const float* p, int ldp, int nv, float* accT, int lda) {
  for (int d = 0; d < D; d++) {
    float* a = accT + (int64_t)d * lda;
    for (int j = 0; j < nv; j++) {
      v16 s = load(a + j * W);
      for (int r = 0; r < R; r++) s += rows[r * D + d] * load(p + r * ldp + j * W);
      store(a + j * W, s);
    }
  }
}

// The head's K (or V) as D x Tp, transposed and zero-padded to Tp keys.
static void gather_transposed(const float* base, int64_t st, int T, int D, int Tp, float* outT) {
  std::memset(outT, 0, sizeof(float) * (size_t)D * Tp);
  for (int j = 0; j < T; j++)
    for (int d = 0; d < D; d++) outT[(int64_t)d * Tp + j] = base[j * st + d];
}

static void gather_rows(const float* base, int64_t st, int first, int n, int D, float* out) {
  std::memset(out, 0, sizeof(float) * R * D);
  for (int r = 0; r < n; r++) std::memcpy(out + r * D, base + (first + r) * st, sizeof(float) * D);
}

// p[r][j] = exp(scale * s[r][j] - shift[r]) for keys j <= first + r, else 0 (over nv * W keys).
static void causal_exp(float* s, int ld, int first, int nv, float scale, const float* shift) {
  const i16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (int r = 0; r < R; r++) {
    for (int j = 0; j < nv; j++) {
      v16 x = vexp(load(s + r * ld + j * W) * scale - shift[r]);
      i16 keep = (iota + j * W) <= (first + r);
      store(s + r * ld + j * W, keep ? x : v16{});
    }
  }
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

static void forward_head(const Layout& qkv, const Layout& y, float* lse, int b, int h, int T, int C, int D, float scale) {
  int Tp = (T + W - 1) / W * W;
  float* kT = scratch.get((size_t)2 * Tp * D + R * D + R * Tp + R * D);
  float* v = kT + (size_t)Tp * D;
  float* q = v + (size_t)Tp * D;
  float* s = q + R * D;
  float* o = s + R * Tp;
  const float* qb = qkv.at(b, h, D);
  gather_transposed(qb + C, qkv.st, T, D, Tp, kT);
  for (int j = 0; j < T; j++) std::memcpy(v + (int64_t)j * D, qb + 2 * C + j * qkv.st, sizeof(float) * D);
  for (int i0 = 0; i0 < T; i0 += R) {
    int nr = std::min(R, T - i0), nk = i0 + nr, nv = (nk + W - 1) / W;
    gather_rows(qb, qkv.st, i0, nr, D, q);
    rows_times_cols(q, kT, D, Tp, nv, s, Tp);
    float shift[R], inv[R];
    for (int r = 0; r < R; r++) {  // the row's max over its keys 0..i0+r
      float m = -INFINITY;
      for (int j = 0; j <= std::min(i0 + r, T - 1); j++) m = std::max(m, s[r * Tp + j]);
      shift[r] = m * scale;
    }
    causal_exp(s, Tp, i0, nv, scale, shift);
    for (int r = 0; r < R; r++) {
      v16 sum = {};
      for (int j = 0; j < nv; j++) sum += load(s + r * Tp + j * W);
      float l = hsum(sum);
      inv[r] = 1.0f / l;
      if (r < nr) lse[i0 + r] = shift[r] + std::log(l);
    }
    probs_times_rows(s, Tp, v, D, nk, inv, o);
    for (int r = 0; r < nr; r++) std::memcpy(y.at(b, h, D) + (i0 + r) * y.st, o + r * D, sizeof(float) * D);
  }
}

static void backward_head(const Layout& qkv, const Layout& y, const Layout& gy, const float* lse, const Layout& g,
                          int b, int h, int T, int C, int D, float scale) {
  int Tp = (T + W - 1) / W * W;
  size_t plane = (size_t)Tp * D;
  float* kT = scratch.get(5 * plane + 3 * R * D + 2 * R * Tp + R * D);
  float* vT = kT + plane;
  float* k = vT + plane;
  float* gkT = k + plane;
  float* gvT = gkT + plane;
  float* q = gvT + plane;
  float* dy = q + R * D;
  float* o = dy + R * D;
  float* p = o + R * D;
  float* ds = p + R * Tp;
  float* gq = ds + R * Tp;
  const float* qb = qkv.at(b, h, D);
  gather_transposed(qb + C, qkv.st, T, D, Tp, kT);
  gather_transposed(qb + 2 * C, qkv.st, T, D, Tp, vT);
  for (int j = 0; j < T; j++) std::memcpy(k + (int64_t)j * D, qb + C + j * qkv.st, sizeof(float) * D);
  std::memset(gkT, 0, sizeof(float) * 2 * plane);
  const float* lseh = lse;
  for (int i0 = 0; i0 < T; i0 += R) {
    int nr = std::min(R, T - i0), nk = i0 + nr, nv = (nk + W - 1) / W;
    gather_rows(qb, qkv.st, i0, nr, D, q);
    gather_rows(gy.at(b, h, D), gy.st, i0, nr, D, dy);
    gather_rows(y.at(b, h, D), y.st, i0, nr, D, o);
    float shift[R], rowdot[R], ones[R];
    for (int r = 0; r < R; r++) {
      shift[r] = r < nr ? lseh[i0 + r] : 0.0f;
      float acc = 0.0f;
      for (int d = 0; d < D; d++) acc += dy[r * D + d] * o[r * D + d];
      rowdot[r] = acc;
      ones[r] = scale;
    }
    rows_times_cols(q, kT, D, Tp, nv, p, Tp);
    causal_exp(p, Tp, i0, nv, scale, shift);
    rows_times_cols(dy, vT, D, Tp, nv, ds, Tp);
    for (int r = 0; r < R; r++)
      for (int j = 0; j < nv; j++) {
        v16 pv = load(p + r * Tp + j * W);
        store(ds + r * Tp + j * W, pv * (load(ds + r * Tp + j * W) - rowdot[r]));
      }
    probs_times_rows(ds, Tp, k, D, nk, ones, gq);
    for (int r = 0; r < nr; r++) std::memcpy(g.at(b, h, D) + (i0 + r) * g.st, gq + r * D, sizeof(float) * D);
    add_outer(q, D, ds, Tp, nv, gkT, Tp);
    add_outer(dy, D, p, Tp, nv, gvT, Tp);
  }
  float* gk = g.at(b, h, D) + C;
  float* gv = gk + C;
  for (int j = 0; j < T; j++)
    for (int d = 0; d < D; d++) {
      gk[j * g.st + d] = scale * gkT[(int64_t)d * Tp + j];
      gv[j * g.st + d] = gvT[(int64_t)d * Tp + j];
    }
}

extern "C" {

int gptrain_attention_abi() { return 1; }

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
}
