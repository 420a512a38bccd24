/* Fused fake-quant forward and backward for contiguous float32 CPU tensors
 * (deployq/quant.py's _fq_forward / _fq_backward in one pass each).
 *
 * Layout: x is [C, K] (C = 1: per-tensor; C > 1: per channel along axis 0).
 * The float ops are those of the torch path in the same order, so the same bits:
 *   t = rne(x / s) (+ z);  out = (clamp(t, qmin, qmax) (- z)) * s
 * The learned-step-size entry points (deployq_lfq_*, deployq_rows_*) keep no t: their
 * backward recomputes t and out from x with the same ops, and sums what the stored ones
 * gave, in the same order.
 * Must be compiled without -ffast-math and with -ffp-contract=off: the bits are the
 * contract (ONNX QuantizeLinear / DequantizeLinear), and `q + 0.0f` (which turns
 * -0.0 into +0.0) must not be folded away.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Round half to even under the default rounding mode, as nearbyintf (and
 * torch.round): adding 2^23 leaves no fraction bits, so the FPU rounds; the sign
 * (including -0.0) is put back. Vectorises with plain SSE2, unlike a libm call. */
static inline float rne(float v) {
    float a = fabsf(v);
    float r = a < 8388608.0f ? (a + 8388608.0f) - 8388608.0f : a;
    return copysignf(r, v);
}

/* torch.clamp: NaN propagates, an equal value (e.g. -0.0 at qmin 0) is kept */
static inline float clampf(float v, float lo, float hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

/* g where `on`, else +0.0: a bit mask rather than a select, which GCC does not always
 * if-convert in these loops (a select there cost 10x) */
static inline float masked(float gv, int on) {
    uint32_t gb, m = on ? 0xffffffffu : 0u;
    memcpy(&gb, &gv, 4);
    gb &= m;
    memcpy(&gv, &gb, 4);
    return gv;
}
/* torch.relu: -0.0 and NaN pass unchanged. The learned entry points take `relu`: x is
 * the input of a ReLU whose output only they read (deployq/relu_absorb.py), so they
 * quantize relu(x) and the ReLU's output is never written. */
static inline float relu_f(float v) { return masked(v, !(v < 0.0f)); }

int deployq_fq_abi(void) { return 9; }

/* mode 0: no zero-point (t = rne(x/s)); 1: t += z, no subtraction (a fixed zero-point
 * of 0: turns -0.0 into +0.0); 2: t += z and out = (clamp(t) - z) * s. fq_t and fq_out are
 * the whole forward of one element: the backward recomputes them from x (deployq_lfq_*),
 * which costs a division and saves writing t and reading t and out back from memory. */
static inline __attribute__((always_inline)) float fq_t(float xv, float s, float z, const int mode) {
    float q = rne(xv / s);
    if (mode >= 1) q = q + z;
    return q;
}
static inline __attribute__((always_inline)) float fq_out(float q, float s, float z, const int mode, float qmin,
                                                          float qmax) {
    float o = clampf(q, qmin, qmax);
    if (mode == 2) o = o - z;
    return o * s;
}
/* Software prefetch distance (floats ahead; a 64-byte line per 16 floats). On the 2-core
 * VMs we measure on, a streaming loop over tensors that left the cache ran 2-3x slower
 * without it (backward of a 1 MB activation: 331 -> 158 us). */
#define PD 1024
#define PREFETCH(p) __builtin_prefetch(p, 0, 0)
#define PREFETCH_W(p) __builtin_prefetch(p, 1, 0)

static inline __attribute__((always_inline)) void fwd_one(const float *x, float *t, float *out, int64_t i, float s,
                                                          float z, const int mode, float qmin, float qmax,
                                                          const int rl) {
    float q = fq_t(rl ? relu_f(x[i]) : x[i], s, z, mode);
    if (t) t[i] = q;
    out[i] = fq_out(q, s, z, mode, qmin, qmax);
}
/* t may be NULL (not stored); out and t do not overlap x (ivdep: GCC would otherwise
 * check for overlap on every block of 16) */
static inline __attribute__((always_inline)) void fwd_row(const float *x, float *t, float *out, int64_t k,
                                                          float s, float z, const int mode, float qmin,
                                                          float qmax, const int rl) {
    int64_t i = 0;
    if (t) {
        for (; i + 16 <= k; i += 16) {
            PREFETCH(x + i + PD);
#pragma GCC ivdep
            for (int l = 0; l < 16; l++) fwd_one(x, t, out, i + l, s, z, mode, qmin, qmax, rl);
        }
        for (; i < k; i++) fwd_one(x, t, out, i, s, z, mode, qmin, qmax, rl);
    } else {
        for (; i + 16 <= k; i += 16) {
            PREFETCH(x + i + PD);
            PREFETCH_W(out + i + PD);
#pragma GCC ivdep
            for (int l = 0; l < 16; l++) fwd_one(x, 0, out, i + l, s, z, mode, qmin, qmax, rl);
        }
        for (; i < k; i++) fwd_one(x, 0, out, i, s, z, mode, qmin, qmax, rl);
    }
}

void deployq_fq_forward(const float *x, float *t, float *out, int64_t c, int64_t k, const float *s,
                        const float *z, int mode, float qmin, float qmax) {
    for (int64_t j = 0; j < c; j++) {
        const float sj = s[j];
        const float zj = mode == 2 ? z[j] : 0.0f;
        const int64_t o = j * k;
        if (mode == 0)
            fwd_row(x + o, t + o, out + o, k, sj, 0.0f, 0, qmin, qmax, 0);
        else if (mode == 1)
            fwd_row(x + o, t + o, out + o, k, sj, 0.0f, 1, qmin, qmax, 0);
        else
            fwd_row(x + o, t + o, out + o, k, sj, zj, 2, qmin, qmax, 0);
    }
}

/* One row of the backward: gin = g where lo < t < hi (hardtanh_backward), written to gx
 * (may alias g); sums in double over NA independent lanes (vectorisable without
 * reassociation, and a fixed order): sg_out = sum g*out, sgin_x = sum gin*x,
 * sclip = sum (gin - g) = -(sum of g over clamped elements). */
#define NA 16
/* hardtanh_backward: g where lo < t < hi (NaN t keeps g) */
static inline float keep(float gv, float tv, float lo, float hi) { return masked(gv, !((tv <= lo) | (tv >= hi))); }
/* threshold_backward(g, x, 0), the ReLU's backward (x its output): g where x > 0 (NaN keeps g) */
static inline float keep_pos(float gv, float xv) { return masked(gv, !(xv <= 0.0f)); }

/* One element of a row's backward, x, t and out given as expressions of element j (TV may
 * read xv, OV tv): the lanes' sums and gx (rl: also masked where xv <= 0, the ReLU's
 * backward). */
#define BWD_ONE(j, l, XV, TV, OV)                                   \
    do {                                                            \
        float gv = g[j], xv = (XV);                                 \
        float tv = (TV);                                            \
        float gi = keep(gv, tv, lo, hi);                            \
        if (ds) {                                                   \
            a1[l] += (double)gv * (double)(OV);                     \
            a2[l] += (double)gi * (double)xv;                       \
        }                                                           \
        if (dz) a3[l] += (double)gi - (double)gv;                   \
        if (dx) gx[j] = rl ? keep_pos(gi, xv) : gi;                 \
    } while (0)

/* The lanes' sums added in lane order: res[0] = sum g*out - sum gin*x, res[1] = sum (gin - g). */
static inline void lane_sums(const double *a1, const double *a2, const double *a3, double *res) {
    double s1 = 0, s2 = 0, s3 = 0;
    for (int l = 0; l < NA; l++) {
        s1 += a1[l];
        s2 += a2[l];
        s3 += a3[l];
    }
    res[0] = s1 - s2;
    res[1] = s3;
}

static inline __attribute__((always_inline)) void bwd_row(const float *g, const float *t, const float *out,
                                                          const float *x, float *gx, int64_t k, float lo,
                                                          float hi, const int dx, const int ds, const int dz,
                                                          double *res) {
    const int rl = 0; /* a stored t: no ReLU taken over */
    double a1[NA] = {0}, a2[NA] = {0}, a3[NA] = {0};
    int64_t i = 0;
    /* ivdep: gx may be g itself; each element is read before it is written, so there is
     * no dependence, but GCC's runtime alias check would pick the scalar loop. */
    for (; i + NA <= k; i += NA) {
#pragma GCC ivdep
        for (int l = 0; l < NA; l++) BWD_ONE(i + l, l, ds ? x[i + l] : 0.0f, t[i + l], out[i + l]);
    }
    for (int l = 0; i < k; i++, l++) BWD_ONE(i, l, ds ? x[i] : 0.0f, t[i], out[i]);
    lane_sums(a1, a2, a3, res);
}

/* gx: x's gradient (NULL: not needed; may be g itself); gs: s's gradient per channel
 * (NULL: not needed) = (sum g*out - sum gin*x) / s * gf; gz (NULL unless zmask) =
 * sum(gin - g) * s * zmask * gf: the torch path's float ops after the sums. */
static void row_sums(const float *g, const float *t, const float *out, const float *x, float *gx, int64_t k,
                     float lo, float hi, int dx, int ds, int dz, double *r) {
    switch (dx * 4 + ds * 2 + dz) {
        case 0: r[0] = r[1] = 0; break;
        case 1: bwd_row(g, t, out, x, gx, k, lo, hi, 0, 0, 1, r); break;
        case 2: bwd_row(g, t, out, x, gx, k, lo, hi, 0, 1, 0, r); break;
        case 3: bwd_row(g, t, out, x, gx, k, lo, hi, 0, 1, 1, r); break;
        case 4: /* x's gradient only: a plain loop (no sums) */
            for (int64_t i = 0; i < k; i++) gx[i] = keep(g[i], t[i], lo, hi);
            r[0] = r[1] = 0;
            break;
        case 5: bwd_row(g, t, out, x, gx, k, lo, hi, 1, 0, 1, r); break;
        case 6: bwd_row(g, t, out, x, gx, k, lo, hi, 1, 1, 0, r); break;
        default: bwd_row(g, t, out, x, gx, k, lo, hi, 1, 1, 1, r); break;
    }
}

/* bwd_row from g and x alone: t and out recomputed by the forward's float ops (fq_t,
 * fq_out), so the same bits as stored ones and the same sums in the same order (training
 * is bit for bit what it was with t and out stored). A division per element instead of
 * writing t in the forward and reading t and out back: one stream less each way.
 * rl: x is a ReLU's input (the forward quantized relu(x)). */
static inline __attribute__((always_inline)) void bwd_row_x(const float *g, const float *x, float *gx, int64_t k,
                                                            float s, float z, const int mode, float qmin,
                                                            float qmax, const int dx, const int ds, const int dz,
                                                            const int rl, double *res) {
    const float lo = qmin - 0.5f, hi = qmax + 0.5f;
    double a1[NA] = {0}, a2[NA] = {0}, a3[NA] = {0};
    int64_t i = 0;
    /* ivdep: gx may be g itself; each element is read before it is written */
    for (; i + NA <= k; i += NA) {
        PREFETCH_W(g + i + PD);
        PREFETCH(x + i + PD);
#pragma GCC ivdep
        for (int l = 0; l < NA; l++)
            BWD_ONE(i + l, l, rl ? relu_f(x[i + l]) : x[i + l], fq_t(xv, s, z, mode),
                    fq_out(tv, s, z, mode, qmin, qmax));
    }
    for (int l = 0; i < k; i++, l++)
        BWD_ONE(i, l, rl ? relu_f(x[i]) : x[i], fq_t(xv, s, z, mode), fq_out(tv, s, z, mode, qmin, qmax));
    lane_sums(a1, a2, a3, res);
}

/* bwd_row_x with mode and which outputs are wanted as constants (one loop each). rl: x is
 * the input of a ReLU taken over (deployq/relu_absorb.py): t and out from relu(x), and x's
 * gradient (if wanted) also masked where x <= 0. */
#define BWD_X(m, fx, fs, fz, fr) bwd_row_x(g, x, gx, k, s, z, m, qmin, qmax, fx, fs, fz, fr, r)
#define BWD_X_MODE(m)                                  \
    switch (rl * 8 + dx * 4 + ds * 2 + dz) {           \
        case 1: BWD_X(m, 0, 0, 1, 0); break;           \
        case 2: BWD_X(m, 0, 1, 0, 0); break;           \
        case 3: BWD_X(m, 0, 1, 1, 0); break;           \
        case 4: BWD_X(m, 1, 0, 0, 0); break;           \
        case 5: BWD_X(m, 1, 0, 1, 0); break;           \
        case 6: BWD_X(m, 1, 1, 0, 0); break;           \
        case 7: BWD_X(m, 1, 1, 1, 0); break;           \
        case 9: BWD_X(m, 0, 0, 1, 1); break;           \
        case 10: BWD_X(m, 0, 1, 0, 1); break;          \
        case 11: BWD_X(m, 0, 1, 1, 1); break;          \
        case 12: BWD_X(m, 1, 0, 0, 1); break;          \
        case 13: BWD_X(m, 1, 0, 1, 1); break;          \
        case 14: BWD_X(m, 1, 1, 0, 1); break;          \
        case 15: BWD_X(m, 1, 1, 1, 1); break;          \
        default: r[0] = r[1] = 0; break;               \
    }
/* dx: 0 or 1 (x's gradient wanted); rl as bwd_row_x */
static void row_sums_x(const float *g, const float *x, float *gx, int64_t k, float s, float z, int mode, float qmin,
                       float qmax, int dx, int ds, int dz, int rl, double *r) {
    if (mode == 0) {
        BWD_X_MODE(0)
    } else if (mode == 1) {
        BWD_X_MODE(1)
    } else {
        BWD_X_MODE(2)
    }
}
#undef BWD_X_MODE
#undef BWD_X

/* Threads for one per-tensor row (OpenMP, when compiled with it: the build links the
 * libgomp torch already loaded, so torch and this share one thread pool). Fixed chunks
 * of whole cache lines per thread, partial sums added in thread order: the result only
 * depends on the thread count. Below PAR_MIN elements a second thread costs more than
 * it saves (torch's own grain size is 32768). */
#define PAR_MIN 65536
#define MAXT 64
static int threads_for(int64_t k, int nt) {
    if (nt > MAXT) nt = MAXT;
    return k >= PAR_MIN && nt > 1 ? nt : 1;
}
static __attribute__((unused)) void chunk(int64_t k, int n, int i, int64_t *b, int64_t *e) {
    int64_t c = (((k + n - 1) / n) + 15) & ~(int64_t)15;
    *b = c * i < k ? c * i : k;
    *e = *b + c < k ? *b + c : k;
}

static void row_sums_par(const float *g, const float *x, float *gx, int64_t k, float s, float z, int mode,
                         float qmin, float qmax, int dx, int ds, int dz, int rl, double *r, int nt) {
    nt = threads_for(k, nt);
#ifdef _OPENMP
    if (nt > 1) {
        double part[MAXT][2];
        int used = 1;
#pragma omp parallel num_threads(nt)
        {
            int n = omp_get_num_threads(), i = omp_get_thread_num();
            int64_t b, e;
            chunk(k, n, i, &b, &e);
            row_sums_x(g + b, x + b, gx ? gx + b : 0, e - b, s, z, mode, qmin, qmax, dx, ds, dz, rl, part[i]);
            if (i == 0) used = n;
        }
        r[0] = r[1] = 0;
        for (int i = 0; i < used; i++) {
            r[0] += part[i][0];
            r[1] += part[i][1];
        }
        return;
    }
#endif
    (void)nt;
    row_sums_x(g, x, gx, k, s, z, mode, qmin, qmax, dx, ds, dz, rl, r);
}

/* gx: x's gradient (NULL: not needed; may be g itself); gs: s's gradient per channel
 * (NULL: not needed) = (sum g*out - sum gin*x) / s * gf; gz (NULL unless zmask) =
 * sum(gin - g) * s * zmask * gf: the torch path's float ops after the sums. */
void deployq_fq_backward(const float *g, const float *t, const float *out, const float *x, float *gx,
                         int64_t c, int64_t k, float lo, float hi, const float *s, const float *zmask,
                         float gf, float *gs, float *gz) {
    const int dx = gx != 0, ds = gs != 0, dz = gz != 0;
    for (int64_t j = 0; j < c; j++) {
        const int64_t o = j * k;
        double r[2];
        row_sums(g + o, t + o, ds ? out + o : 0, ds ? x + o : 0, dx ? gx + o : 0, k, lo, hi, dx, ds, dz, r);
        if (ds) gs[j] = ((float)r[0] / s[j]) * gf;
        if (dz) gz[j] = (((float)r[1] * s[j]) * zmask[j]) * gf;
    }
}

/* fwd_row without t, over threads for a large row; y (NULL: none) added to the output (a
 * residual add's other operand: the same float add as torch's a + b), so that the
 * fake-quantized x itself is never written; rl: relu(x) quantized (relu_f) */
static inline __attribute__((always_inline)) void fwd_row_add(const float *x, const float *y, float *out,
                                                              int64_t k, float s, float z, const int mode,
                                                              float qmin, float qmax, const int rl) {
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
        PREFETCH(x + i + PD);
        PREFETCH(y + i + PD);
#pragma GCC ivdep
        for (int l = 0; l < 16; l++) {
            float xv = rl ? relu_f(x[i + l]) : x[i + l];
            out[i + l] = fq_out(fq_t(xv, s, z, mode), s, z, mode, qmin, qmax) + y[i + l];
        }
    }
    for (; i < k; i++) out[i] = fq_out(fq_t(rl ? relu_f(x[i]) : x[i], s, z, mode), s, z, mode, qmin, qmax) + y[i];
}
/* one of fwd_row / fwd_row_add with mode and rl as constants */
#define FWD_MODE(call_, rl_)                                  \
    do {                                                      \
        if (mode == 0)                                        \
            call_(0.0f, 0, rl_);                              \
        else if (mode == 1)                                   \
            call_(0.0f, 1, rl_);                              \
        else                                                  \
            call_(z, 2, rl_);                                 \
    } while (0)
#define FWD_ADD(z_, m_, rl_) fwd_row_add(x, y, out, k, s, z_, m_, qmin, qmax, rl_)
#define FWD_PLAIN(z_, m_, rl_) fwd_row(x, 0, out, k, s, z_, m_, qmin, qmax, rl_)
static void fwd_row_nt(const float *x, const float *y, float *out, int64_t k, float s, float z, int mode, float qmin,
                       float qmax, int rl) {
    if (y && rl)
        FWD_MODE(FWD_ADD, 1);
    else if (y)
        FWD_MODE(FWD_ADD, 0);
    else if (rl)
        FWD_MODE(FWD_PLAIN, 1);
    else
        FWD_MODE(FWD_PLAIN, 0);
}
#undef FWD_PLAIN
#undef FWD_ADD
#undef FWD_MODE
static void fwd_par(const float *x, const float *y, float *out, int64_t k, float s, float z, int mode, float qmin,
                    float qmax, int rl, int nt) {
    nt = threads_for(k, nt);
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        {
            int64_t b, e;
            chunk(k, omp_get_num_threads(), omp_get_thread_num(), &b, &e);
            if (e > b) fwd_row_nt(x + b, y ? y + b : 0, out + b, e - b, s, z, mode, qmin, qmax, rl);
        }
        return;
    }
#endif
    fwd_row_nt(x, y, out, k, s, z, mode, qmin, qmax, rl);
}

/* A cell's step size clamp(|raw_s|, min_scale) to scale[j], its zero-point to zq[j] (mode
 * 2: clamp(rne(raw_z), qmin, qmax), else 0) and zmask[j] (mode 2: that == rne(raw_z), else
 * 1); zq / zmask NULL: not wanted. Returns the zero-point. */
static inline float cell_params(const float *raw_s, const float *raw_z, int64_t j, int mode, float qmin, float qmax,
                                float min_scale, float *scale, float *zq, float *zmask) {
    float a = fabsf(raw_s[j]);
    scale[j] = a < min_scale ? min_scale : a;
    float z = 0.0f, kept = 1.0f; /* outside mode 2 the zero-point is 0 and never clamped */
    if (mode == 2) {
        float zr = rne(raw_z[j]);
        z = clampf(zr, qmin, qmax);
        kept = z == zr ? 1.0f : 0.0f;
    }
    if (zq) zq[j] = z;
    if (zmask) zmask[j] = kept;
    return z;
}

/* LearnedFQ (deployq/quant.py) in one call: from a quantizer's raw cells, the step size
 * scale = clamp(|raw_s|, min_scale) (written to `scale`, [c]), the zero-point
 * z = clamp(rne(raw_z), qmin, qmax) (0 unless mode 2; written to `zq`, [c], unless NULL)
 * and zmask = (z == rne(raw_z)) (1 unless mode 2; NULL: not needed), then out as
 * deployq_fq_forward. t is not kept: deployq_lfq_backward recomputes it from x. relu:
 * relu(x) is quantized (relu_f). nt: threads to use (torch's setting). */
void deployq_lfq_forward(const float *x, float *out, int64_t c, int64_t k, const float *raw_s, const float *raw_z,
                         int mode, float qmin, float qmax, float min_scale, float *scale, float *zq, float *zmask,
                         int relu, int nt) {
    for (int64_t j = 0; j < c; j++) {
        float zj = cell_params(raw_s, raw_z, j, mode, qmin, qmax, min_scale, scale, zq, zmask);
        fwd_par(x + j * k, 0, out + j * k, k, scale[j], zj, mode, qmin, qmax, relu, nt);
    }
}

/* deployq_lfq_forward for one per-tensor cell with y added to the output (fwd_row_add);
 * the backward is deployq_lfq_backward's (it reads x, not the output). */
void deployq_lfq_forward_add(const float *x, const float *y, float *out, int64_t k, const float *raw_s,
                             const float *raw_z, int mode, float qmin, float qmax, float min_scale, float *scale,
                             float *zq, float *zmask, int relu, int nt) {
    float z = cell_params(raw_s, raw_z, 0, mode, qmin, qmax, min_scale, scale, zq, zmask);
    fwd_par(x, y, out, k, scale[0], z, mode, qmin, qmax, relu, nt);
}

/* The backward of deployq_lfq_forward from g and x (t and out recomputed): gx (NULL: not
 * needed; may be g itself), then the step size's gradient as deployq_fq_backward, taken
 * through scale = clamp(|raw_s|, min_scale) as autograd does (where(|raw| >= min, gs, 0)
 * * sgn(raw)): g_raw_s (NULL: not needed), g_raw_z (NULL unless zmask); zq: the
 * forward's zero-points (mode 2); relu: as in the forward, x is a ReLU's input: t and out
 * are recomputed from relu(x) and gx is also masked where x <= 0 (the ReLU's backward
 * taken over); nt as above. */
void deployq_lfq_backward(const float *g, const float *x, float *gx, int64_t c, int64_t k, const float *scale,
                          const float *zq, int mode, float qmin, float qmax, const float *zmask, float gf,
                          const float *raw_s, float min_scale, float *g_raw_s, float *g_raw_z, int relu, int nt) {
    const int dx = gx != 0, ds = g_raw_s != 0, dz = g_raw_z != 0;
    for (int64_t j = 0; j < c; j++) {
        const int64_t o = j * k;
        double r[2];
        row_sums_par(g + o, x + o, dx ? gx + o : 0, k, scale[j], mode == 2 ? zq[j] : 0.0f, mode, qmin, qmax, dx, ds,
                     dz, relu, r, nt);
        if (dz) g_raw_z[j] = (((float)r[1] * scale[j]) * zmask[j]) * gf;
        if (ds) {
            float gs = ((float)r[0] / scale[j]) * gf;
            float rs = raw_s[j];
            float sg = rs > 0.0f ? 1.0f : (rs < 0.0f ? -1.0f : 0.0f);
            g_raw_s[j] = (fabsf(rs) >= min_scale ? gs : 0.0f) * sg;
        }
    }
}

/* Many fake-quants in one call (the stacked sandwich, deployq/stacked.py): r rows of k
 * floats; row i reads row (i % xr) of x (xr = r: every row its own input; xr < r: the
 * same weight quantized by several cells) and is quantized with step-size scalar
 * cell_of[i]. Per scalar c (nc of them): raw_s[c], raw_z[c] (read in mode 2 only),
 * mode[c] (0, 1, 2 as deployq_fq_forward; 3: the row passes unchanged), qmin[c],
 * qmax[c]. A per-tensor cell is one scalar many rows share; a per-channel cell is one
 * scalar per row. Writes scale[c], zq[c] (the zero-point; 0 unless mode 2) and, if zmask
 * is not NULL, zmask[c] (mode 2; 1 elsewhere) as deployq_lfq_forward. Each row's floats
 * are those of deployq_lfq_forward on that row alone. relu: as there (mode-3 rows pass
 * relu(x)). */
void deployq_rows_forward(const float *x, int64_t xr, float *out, int64_t r, int64_t k, const int32_t *cell_of,
                          int64_t nc, const float *raw_s, const float *raw_z, const int32_t *mode,
                          const float *qmin, const float *qmax, float min_scale, float *scale, float *zq,
                          float *zmask, int relu) {
    for (int64_t c = 0; c < nc; c++)
        cell_params(raw_s, raw_z, c, mode[c], qmin[c], qmax[c], min_scale, scale, zq, zmask);
    for (int64_t i = 0; i < r; i++) {
        const int32_t c = cell_of[i];
        const float *xi = x + (i % xr) * k;
        float *oi = out + i * k;
        if (mode[c] == 3 && relu)
            for (int64_t j = 0; j < k; j++) oi[j] = relu_f(xi[j]);
        else if (mode[c] == 3)
            memcpy(oi, xi, (size_t)k * sizeof(float));
        else
            fwd_row_nt(xi, 0, oi, k, scale[c], zq[c], mode[c], qmin[c], qmax[c], relu);
    }
}

/* The backward of deployq_rows_forward from g and x (t and out recomputed, zq: the
 * forward's zero-points). gx (NULL: not needed; may be g itself) gets each
 * row's input gradient (rows of a mode-3 scalar: g unchanged); the step-size gradient of
 * scalar c sums, in double, the row sums of every row that uses it, then takes the float
 * ops of deployq_lfq_backward: g_raw_s[c] (NULL: not needed), g_raw_z[c] (NULL: not
 * needed; 0 unless mode 2). gf[c]: the LSQ factor; acc: 2 * nc doubles of scratch; relu:
 * as deployq_lfq_backward (mode-3 rows too). */
void deployq_rows_backward(const float *g, const float *x, int64_t xr, float *gx, int64_t r, int64_t k,
                           const int32_t *cell_of, int64_t nc, const int32_t *mode, const float *qmin,
                           const float *qmax, const float *scale, const float *zq, const float *zmask,
                           const float *gf, const float *raw_s, float min_scale, double *acc, float *g_raw_s,
                           float *g_raw_z, int relu) {
    const int dx = gx != 0, ds = g_raw_s != 0;
    for (int64_t c = 0; c < 2 * nc; c++) acc[c] = 0.0;
    for (int64_t i = 0; i < r; i++) {
        const int32_t c = cell_of[i];
        const int64_t o = i * k;
        if (mode[c] == 3) {
            if (dx && relu) {
                const float *xi = x + (i % xr) * k;
                for (int64_t j = 0; j < k; j++) gx[o + j] = keep_pos(g[o + j], xi[j]);
            } else if (dx && gx + o != g + o) {
                memcpy(gx + o, g + o, (size_t)k * sizeof(float));
            }
            continue;
        }
        const int dz = g_raw_z != 0 && mode[c] == 2;
        double rr[2];
        row_sums_x(g + o, x + (i % xr) * k, dx ? gx + o : 0, k, scale[c], zq[c], mode[c], qmin[c], qmax[c], dx, ds,
                   dz, relu, rr);
        acc[2 * c] += rr[0];
        acc[2 * c + 1] += rr[1];
    }
    for (int64_t c = 0; c < nc; c++) {
        if (g_raw_z) g_raw_z[c] = mode[c] == 2 ? (((float)acc[2 * c + 1] * scale[c]) * zmask[c]) * gf[c] : 0.0f;
        if (ds) {
            if (mode[c] == 3) {
                g_raw_s[c] = 0.0f;
                continue;
            }
            float gs = ((float)acc[2 * c] / scale[c]) * gf[c];
            float rs = raw_s[c];
            float sg = rs > 0.0f ? 1.0f : (rs < 0.0f ? -1.0f : 0.0f);
            g_raw_s[c] = (fabsf(rs) >= min_scale ? gs : 0.0f) * sg;
        }
    }
}

/* Weight distribution regularisation (deployq/losses.py, wdr_loss) in three passes per
 * layer: layer l holds n[l] floats at w[l]. stats (5 doubles a layer): mean, std
 * (population), then with z = (w - mean) / (std + eps): mean z^2, mean z^3 (skewness),
 * mean z^4 (kurtosis). Sums in double over WL independent lanes (vectorisable, a fixed
 * order). */
#define WL 8
void deployq_wdr_stats(const float *const *w, const int64_t *n, int64_t layers, double eps, double *stats) {
    for (int64_t l = 0; l < layers; l++) {
        const float *x = w[l];
        const int64_t k = n[l];
        double a[WL] = {0}, b[WL] = {0}, c[WL] = {0};
        int64_t i = 0;
        for (; i + WL <= k; i += WL)
            for (int j = 0; j < WL; j++) a[j] += (double)x[i + j];
        for (int j = 0; i < k; i++, j++) a[j] += (double)x[i];
        double s = 0;
        for (int j = 0; j < WL; j++) s += a[j];
        const double mean = s / (double)k;
        for (int j = 0; j < WL; j++) a[j] = 0;
        for (i = 0; i + WL <= k; i += WL)
            for (int j = 0; j < WL; j++) {
                double d = (double)x[i + j] - mean;
                a[j] += d * d;
            }
        for (int j = 0; i < k; i++, j++) {
            double d = (double)x[i] - mean;
            a[j] += d * d;
        }
        s = 0;
        for (int j = 0; j < WL; j++) s += a[j];
        const double sd = sqrt(s / (double)k), inv = 1.0 / (sd + eps);
        for (int j = 0; j < WL; j++) a[j] = 0;
        for (i = 0; i + WL <= k; i += WL)
            for (int j = 0; j < WL; j++) {
                double z = ((double)x[i + j] - mean) * inv, z2 = z * z;
                a[j] += z2;
                b[j] += z2 * z;
                c[j] += z2 * z2;
            }
        for (int j = 0; i < k; i++, j++) {
            double z = ((double)x[i] - mean) * inv, z2 = z * z;
            a[j] += z2;
            b[j] += z2 * z;
            c[j] += z2 * z2;
        }
        double m2 = 0, m3 = 0, m4 = 0;
        for (int j = 0; j < WL; j++) {
            m2 += a[j];
            m3 += b[j];
            m4 += c[j];
        }
        double *o = stats + 5 * l;
        o[0] = mean;
        o[1] = sd;
        o[2] = m2 / (double)k;
        o[3] = m3 / (double)k;
        o[4] = m4 / (double)k;
    }
}

/* grad[l] = c0 z^2 + c1 z^3 + c2 z + c3 with z from stats as above; coef: 4 doubles a
 * layer (the chain rule's per-layer factors, computed by the caller). */
void deployq_wdr_grad(const float *const *w, const int64_t *n, int64_t layers, double eps, const double *stats,
                      const double *coef, float *const *grad) {
    for (int64_t l = 0; l < layers; l++) {
        const float *x = w[l];
        float *g = grad[l];
        const double mean = stats[5 * l], inv = 1.0 / (stats[5 * l + 1] + eps);
        const double *cf = coef + 4 * l;
        for (int64_t i = 0; i < n[l]; i++) {
            double z = ((double)x[i] - mean) * inv, z2 = z * z;
            g[i] = (float)(cf[0] * z2 + cf[1] * z2 * z + cf[2] * z + cf[3]);
        }
    }
}
