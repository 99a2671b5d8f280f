/* The bookkeeping of one adaptive explicit Runge–Kutta iteration, fused, for eager CPU solves
 * without gradients (native_rk.py builds and loads this file; it needs only the C library).
 *
 * Why: on a small problem each torch op costs ~1-5 µs of dispatch, about as much as its arithmetic,
 * and an iteration of loop.Advance is ~100 of them. Here it is three kinds of call: rk_aim (where
 * each sample's step ends, the stage times), rk_combine (one stage's argument y + h Σ w_j k_j) and
 * rk_judge (error norm, acceptance, the PI controller, return codes, the stiffness estimate, the
 * next state, the save points the step covers); rk_first_step_a/_b are the initial step.
 *
 * loop.Advance, explicit_rk.py and controller.py are the reference: every formula below is
 * theirs, in the same floating-point type and, where it matters, the same order (a step's end
 * τ + h rounds, so the step is that end minus τ). Sums may round differently from torch's
 * reductions and matrix products, so results agree to rounding, not bit for bit.
 *
 * States are (B, n) row-major; stages are passed as an array of pointers to (B, n) arrays.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* An iteration's per-sample results are rows of one (7 + s, B) array F (the last s rows: the stage
 * times t + c_i h) and one (3, B) array U (native_rk.py names the same rows); the new state and k1
 * are the first two rows of Y (2 + s, B, n), whose other rows hold the stage arguments. */
enum { H_ROW, T_END_ROW, EEST_ROW, TAU_ROW, DT_ROW, ERROLD_ROW, STIFF_ROW, TIMES_ROW };
enum { HIT_ROW, ACCEPT_ROW, RUNNING_ROW };

/* torch's addcmul (the stage times and arguments, the dense output) rounds once where its CPU
 * kernels fuse the multiply-add (AVX2/AVX512 builds) and twice where they do not: MADD follows the
 * `fused` flag that native_rk.py sets from torch itself. Elsewhere separate operations round
 * separately, as torch's do (native_build compiles with -ffp-contract=off). */

/* |x| < inf: false for ±inf and NaN (as controller.rows_finite). */
#define FINITE(x) ((x) < INFINITY && (x) > -INFINITY)

/* torch.maximum: NaN if either is NaN (C's fmax would drop it). */
#define NAN_MAX(a, b) (((a) != (a) || (b) != (b)) ? ((a) + (b)) : ((a) > (b) ? (a) : (b)))
#define NAN_MIN(a, b) (((a) != (a) || (b) != (b)) ? ((a) + (b)) : ((a) < (b) ? (a) : (b)))

#define DEFINE_RK_STEP(T, SUFFIX, SQRT, POW, NEXTAFTER, FMA, INF)                                 \
                                                                                                 \
/* What stays the same through a solve (native_rk mirrors it): sizes, the nodes c and the error    \
   weights (b − b̂), per-sample end times and limits, (B, n) tolerances, the controller's          \
   constants, the return codes, and the save points (ys NULL: none written here; dense NULL:      \
   cubic Hermite). */                                                                             \
typedef struct {                                                                                 \
    int64_t B, n, s, lockstep, fused;                                                            \
    const T *nodes, *btilde, *tau_end, *slack, *dtmax, *atol, *rtol;                             \
    T beta1, beta2, gamma, qmin, qmax, qsteady_min, qsteady_max, dtmin;                          \
    int64_t code_running, code_success, code_dtmin, code_unstable;                               \
    int64_t n_save, D;                                                                           \
    const T *tau_save, *dense;                                                                   \
    int64_t *next_save;                                                                          \
    T *ys;                                                                                       \
} rk_setup_##SUFFIX;                                                                             \
                                                                                                 \
/* a·b + x as torch's addcmul rounds it (see above). */                                          \
static T madd_##SUFFIX(int fused, T a, T b, T x) { return fused ? FMA(a, b, x) : x + a * b; }    \
                                                                                                 \
/* out[e] = Σ_j w_j ks[j][e] over the m elements, summed in the order of j. */                  \
static void weighted_sum_##SUFFIX(T *restrict out, const T *const *ks, const T *w, int64_t nk,  \
                                  int64_t m) {                                                   \
    const T *restrict k0 = ks[0];                                                                \
    for (int64_t e = 0; e < m; ++e) out[e] = w[0] * k0[e];                                       \
    for (int64_t j = 1; j < nk; ++j) {                                                           \
        const T *restrict kj = ks[j];                                                            \
        const T wj = w[j];                                                                       \
        for (int64_t e = 0; e < m; ++e) out[e] += wj * kj[e];                                    \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
/* h, the step's end time t_end and the stage times per sample; hit: the step lands on the end    \
   (loop.Advance.aim). */                                                                         \
void rk_aim_##SUFFIX(const rk_setup_##SUFFIX *c, const T *tau, const T *dt,                      \
                        const int64_t *status, T *F, uint8_t *U) {                               \
    const int64_t B = c->B, running_code = c->code_running;                                      \
    T *h = F + H_ROW * B, *t_end = F + T_END_ROW * B;                                            \
    uint8_t *hit = U + HIT_ROW * B;                                                              \
    const T *tau_end = c->tau_end, *slack = c->slack;                                            \
    const T snap_fraction = (T)0.01;                                                             \
    for (int64_t b = 0; b < B; ++b) {                                                            \
        int active = status[b] == running_code;                                                  \
        T remaining = tau_end[b] - tau[b];                                                       \
        T raw_end = tau[b] + (active ? dt[b] : (T)0);                                            \
        T cap = NAN_MIN(slack[b], snap_fraction * dt[b]);                                        \
        int lands = active && ((dt[b] >= remaining - cap) || (raw_end >= tau_end[b]));           \
        T end = lands ? tau_end[b] : raw_end;                                                    \
        hit[b] = (uint8_t)lands;                                                                 \
        t_end[b] = end;                                                                          \
        h[b] = end - tau[b];                                                                     \
    }                                                                                            \
    for (int64_t i = 0; i < c->s; ++i)                                                           \
        for (int64_t b = 0; b < B; ++b)                                                          \
            F[(TIMES_ROW + i) * B + b] = madd_##SUFFIX(c->fused, h[b], c->nodes[i], tau[b]);     \
}                                                                                                \
                                                                                                 \
/* _safe_sqrt: 0 for x ≤ 0 or NaN. */                                                           \
static T safe_sqrt_##SUFFIX(T x) { return x > 0 ? SQRT(x) : (T)0; }                             \
                                                                                                 \
/* controller.step_floor: one ulp of max(|t|, 1). */                                             \
static T step_floor_##SUFFIX(T t) {                                                              \
    T m = t < 0 ? -t : t;                                                                        \
    m = m < 1 ? (T)1 : m;                                                                        \
    return NEXTAFTER(m, INF) - m;                                                                \
}                                                                                                \
                                                                                                 \
/* controller.Norm of x/sk (sk = atol + rtol|y0|), x = a − b (b may be NULL): per sample, or in    \
   lockstep over the rows where `valid` (NULL: all) as one value for every sample; a NaN or        \
   non-positive mean square gives 0 (_safe_sqrt). */                                              \
static void scaled_norm_##SUFFIX(const rk_setup_##SUFFIX *c, const T *y0, const T *a, const T *b, \
                                 const uint8_t *valid, T *out) {                                 \
    const int64_t B = c->B, n = c->n;                                                            \
    double total = 0;                                                                            \
    int64_t rows = 0;                                                                            \
    for (int64_t r = 0; r < B; ++r) {                                                            \
        T sq = 0;                                                                                \
        for (int64_t i = 0; i < n; ++i) {                                                        \
            int64_t e = r * n + i;                                                               \
            T ay = y0[e] < 0 ? -y0[e] : y0[e];                                                   \
            T x = (b ? a[e] - b[e] : a[e]) / (c->atol[e] + ay * c->rtol[e]);                     \
            sq += x * x;                                                                         \
        }                                                                                        \
        if (!c->lockstep) out[r] = safe_sqrt_##SUFFIX(sq / (T)n);                                \
        else if (!valid || valid[r]) { total += sq; ++rows; }                                    \
    }                                                                                            \
    if (c->lockstep) {                                                                           \
        T v = safe_sqrt_##SUFFIX((T)(total / (double)(rows > 0 ? rows * n : 1)));                \
        for (int64_t r = 0; r < B; ++r) out[r] = v;                                              \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
static void rows_finite_##SUFFIX(const T *x, int64_t B, int64_t n, uint8_t *out) {              \
    for (int64_t r = 0; r < B; ++r) {                                                            \
        int ok = 1;                                                                              \
        for (int64_t i = 0; i < n; ++i) ok &= FINITE(x[r * n + i]);                               \
        out[r] = (uint8_t)ok;                                                                    \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
/* Hairer–Wanner's starting step (controller.initial_step) in two halves around the one call of f: \
   the first gives dt0 and the point (t0 + dt0, y0 + dt0 f0) to evaluate f at; the second, given f \
   there, the step. W (5, B): rows d1, dt0, t1 (f's time: never written again), scratch and the    \
   result; V (2, B) scratch; y1 (B, n). */                                                        \
void rk_first_step_a_##SUFFIX(const rk_setup_##SUFFIX *c, const T *t0, const T *y0, const T *f0, \
                              T *W, uint8_t *V, T *y1) {                                         \
    const int64_t B = c->B, n = c->n;                                                            \
    T *d1 = W, *dt0 = W + B, *t1 = W + 2 * B, *d0 = W + 3 * B;   /* (row 3: scratch here) */    \
    uint8_t *valid = c->lockstep ? V : NULL;                                                     \
    if (valid) rows_finite_##SUFFIX(f0, B, n, valid);                                            \
    scaled_norm_##SUFFIX(c, y0, y0, NULL, valid, d0);                                            \
    scaled_norm_##SUFFIX(c, y0, f0, NULL, valid, d1);                                            \
    for (int64_t b = 0; b < B; ++b) {                                                            \
        int small = d0[b] < (T)1e-5 || d1[b] < (T)1e-5;                                          \
        T step = small ? (T)1e-6 : (T)0.01 * d0[b] / d1[b];                                      \
        step = NAN_MIN(NAN_MAX(step, step_floor_##SUFFIX(t0[b])), c->dtmax[b]);                  \
        dt0[b] = step;                                                                           \
        t1[b] = t0[b] + step;                                                                    \
        for (int64_t i = 0; i < n; ++i) y1[b * n + i] = y0[b * n + i] + step * f0[b * n + i];    \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
void rk_first_step_b_##SUFFIX(const rk_setup_##SUFFIX *c, const T *t0, const T *y0, const T *f0, \
                              const T *f1, T order, T *W, uint8_t *V) {                          \
    const int64_t B = c->B, n = c->n;                                                            \
    T *d1 = W, *dt0 = W + B, *d2 = W + 3 * B, *dt = W + 4 * B;                                    \
    uint8_t *valid = NULL;                                                                       \
    if (c->lockstep) {                                                                           \
        valid = V;                                    /* (row 0: f0 finite, from the first half) */ \
        rows_finite_##SUFFIX(f1, B, n, V + B);                                                   \
        for (int64_t b = 0; b < B; ++b) valid[b] = valid[b] && V[B + b];                         \
    }                                                                                            \
    scaled_norm_##SUFFIX(c, y0, f1, f0, valid, d2);                                              \
    for (int64_t b = 0; b < B; ++b) {                                                            \
        T d = d2[b] / dt0[b], dmax = NAN_MAX(d1[b], d);                                          \
        T first = dmax <= (T)1e-15 ? NAN_MAX(dt0[b] * (T)1e-3, (T)1e-6)                          \
                                   : POW((T)0.01 / dmax, (T)1 / order);                          \
        T step = NAN_MIN(NAN_MIN((T)100 * dt0[b], first), c->dtmax[b]);                          \
        if (!FINITE(step)) step = (T)1e-6;                                                       \
        dt[b] = NAN_MIN(NAN_MAX(step, step_floor_##SUFFIX(t0[b])), c->dtmax[b]);                 \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
/* out = y + h ⊙ Σ_j w_j ks[j] (ExplicitRK's stage argument; zero weights kept, as torch's). The  \
   sum runs over j in order for every element, as a vectorisable loop per stage. */              \
void rk_combine_##SUFFIX(T *restrict out, const T *y, const T *h, const T *const *ks,            \
                         const T *w, int64_t nk, int64_t B, int64_t n, int64_t fused) {          \
    weighted_sum_##SUFFIX(out, ks, w, nk, B * n);                                                \
    for (int64_t b = 0; b < B; ++b)                                                              \
        for (int64_t i = 0; i < n; ++i)                                                          \
            out[b * n + i] = madd_##SUFFIX((int)fused, h[b], out[b * n + i], y[b * n + i]);      \
}                                                                                                \
                                                                                                 \
/* The save points sample b's accepted step [t0, t1] covers (loop._flush_saves): y1 at t1, else \
   the method's dense output at θ = (t − t0)/h, y0 + h Σ_i b_i(θ) k_i with                        \
   b_i(θ) = Σ_m dense[i][m] θ^(m+1) (dense (s, D)), or cubic Hermite where dense is NULL          \
   (explicit_rk.hermite). ys (B, n_save, n); next_save[b] advances past what was written. */      \
static void save_##SUFFIX(const rk_setup_##SUFFIX *c, int64_t b, const T *y, const T *y1,       \
                          const T *f_end, const T *const *ks, T t0, T h, T t1) {                 \
    const int64_t n = c->n, s = c->s, n_save = c->n_save, D = c->D;                              \
    const T *tau_save = c->tau_save, *dense = c->dense;                                          \
    int64_t *next_save = c->next_save;                                                           \
    T *ys = c->ys;                                                                               \
    int64_t k = next_save[b];                                                                    \
    for (; k < n_save && tau_save[b * n_save + k] <= t1; ++k) {                                  \
        T tq = tau_save[b * n_save + k], *out = ys + (b * n_save + k) * n;                       \
        if (tq >= t1) {                                                                          \
            for (int64_t i = 0; i < n; ++i) out[i] = y1[b * n + i];                              \
            continue;                                                                            \
        }                                                                                        \
        T th = (tq - t0) / h;                                                                    \
        if (dense) {                                                                             \
            T w[64];                                     /* (s ≤ 64: the tableaus have ≤ 16) */  \
            for (int64_t j = 0; j < s; ++j) {                                                    \
                T power = th, sum = dense[j * D] * power;                                        \
                for (int64_t m = 1; m < D; ++m) { power *= th; sum += dense[j * D + m] * power; } \
                w[j] = sum;                                                                      \
            }                                                                                    \
            for (int64_t i = 0; i < n; ++i) {                                                    \
                T acc = w[0] * ks[0][b * n + i];                                                 \
                for (int64_t j = 1; j < s; ++j) acc += w[j] * ks[j][b * n + i];                  \
                out[i] = madd_##SUFFIX((int)c->fused, h, acc, y[b * n + i]);                     \
            }                                                                                    \
        } else {                                                                                 \
            for (int64_t i = 0; i < n; ++i) {                                                    \
                T a = y[b * n + i], c = y1[b * n + i], f0 = ks[0][b * n + i], f1 = f_end[b * n + i]; \
                out[i] = (1 - th) * a + th * c                                                   \
                         + th * (th - 1) * ((1 - 2 * th) * (c - a) + (th - 1) * h * f0 + th * h * f1); \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
    next_save[b] = k;                                                                            \
}                                                                                                \
                                                                                                 \
/* Everything loop.Advance does after the step's stages (no gradients, adaptive, not stopping at \
   save points). ks: the s stages (ks[s-1] is f_end for FSAL methods); f_end = f(t_end, y1).      \
   Outputs: K (B, s, n) the stages packed, the rows of F and U, Y, status_out. kI, kJ, gI, gJ: the \
   stiffness pair's stage values and arguments. With ys, each accepted step writes the save points \
   it covers (save_). K may be NULL (not wanted). Returns the number of samples still running. */ \
int64_t rk_judge_##SUFFIX(const rk_setup_##SUFFIX *c,                                           \
        const T *y, const T *y1, const T *f_end, const T *k1, const T *const *ks, T *K,          \
        const T *tau, const T *dt, const int64_t *status, const T *errold,                       \
        const T *kI, const T *kJ, const T *gI, const T *gJ,                                      \
        T *F, uint8_t *U, T *Y, int64_t *status_out) {                                           \
    const int64_t B = c->B, n = c->n, s = c->s, lockstep = c->lockstep;                         \
    const int64_t code_running = c->code_running, code_success = c->code_success,               \
                  code_dtmin = c->code_dtmin, code_unstable = c->code_unstable;                 \
    const T *btilde = c->btilde, *dtmax = c->dtmax, *atol = c->atol, *rtol = c->rtol;            \
    const T beta1 = c->beta1, beta2 = c->beta2, gamma = c->gamma, qmin = c->qmin, qmax = c->qmax; \
    const T qsteady_min = c->qsteady_min, qsteady_max = c->qsteady_max, dtmin_opt = c->dtmin;   \
    const T *h = F + H_ROW * B, *t_end = F + T_END_ROW * B;                                      \
    T *eest_out = F + EEST_ROW * B, *tau_out = F + TAU_ROW * B, *dt_out = F + DT_ROW * B;        \
    T *errold_out = F + ERROLD_ROW * B, *stiff_out = F + STIFF_ROW * B;                          \
    const uint8_t *hit = U + HIT_ROW * B;                                                        \
    uint8_t *accept_out = U + ACCEPT_ROW * B, *running_out = U + RUNNING_ROW * B;                \
    T *y_out = Y, *k1_out = Y + B * n;                                                           \
    const T inf = INF;                                                                           \
    /* Pass 1: per sample, the mean square of the scaled error, finiteness, the stiffness sums. */ \
    double lock_err = 0, lock_dk = 0, lock_dg = 0;                                               \
    int64_t lock_err_rows = 0;                                                                   \
    T *comb = y_out;                     /* (scratch: Σ_j b̃_j k_j, until pass 2 writes y_out) */ \
    weighted_sum_##SUFFIX(comb, ks, btilde, s, B * n);                                           \
    if (K)                                                                                       \
        for (int64_t j = 0; j < s; ++j)                                                          \
            for (int64_t b = 0; b < B; ++b)                                                      \
                for (int64_t i = 0; i < n; ++i) K[(b * s + j) * n + i] = ks[j][b * n + i];       \
    for (int64_t b = 0; b < B; ++b) {                                                            \
        int active = status[b] == code_running;                                                  \
        T sq = 0, dk2 = 0, dg2 = 0;                                                              \
        int err_finite = 1, y1_finite = 1, stiff_finite = 1;                                     \
        for (int64_t i = 0; i < n; ++i) {                                                        \
            int64_t e = b * n + i;                                                               \
            T err = h[b] * comb[e];                                                              \
            T ay = y[e] < 0 ? -y[e] : y[e], ay1 = y1[e] < 0 ? -y1[e] : y1[e];                    \
            T ratio = err / (atol[e] + rtol[e] * NAN_MAX(ay, ay1));                              \
            err_finite &= FINITE(ratio);                                                         \
            sq += ratio * ratio;                                                                 \
            T both = y1[e] + f_end[e];                                                           \
            y1_finite &= FINITE(both);                                                           \
            T dk = kJ[e] - kI[e], dg = gJ[e] - gI[e];                                            \
            stiff_finite &= FINITE(dk) && FINITE(dg);                                            \
            dk2 += dk * dk; dg2 += dg * dg;                                                      \
        }                                                                                        \
        accept_out[b] = (uint8_t)(active && y1_finite);   /* (the error test comes below) */     \
        running_out[b] = (uint8_t)err_finite;             /* (scratch until pass 2) */           \
        if (lockstep) {                                                                          \
            if (active && err_finite) { lock_err += sq; ++lock_err_rows; }                       \
            if (stiff_finite) { lock_dk += dk2; lock_dg += dg2; }                                \
        } else {                                                                                 \
            T ms = sq / (T)n;                                                                    \
            eest_out[b] = ms < inf ? SQRT(ms) : inf;                                             \
            T num = safe_sqrt_##SUFFIX(dk2 / (T)n), den = safe_sqrt_##SUFFIX(dg2 / (T)n);          \
            stiff_out[b] = den > 0 ? num / den : (T)0;                                           \
        }                                                                                        \
    }                                                                                            \
    if (lockstep) {                                                                              \
        /* One norm over the rows that are active and finite; the stiffness over finite rows. */ \
        double count = lock_err_rows > 0 ? (double)(lock_err_rows * n) : 1.0;                    \
        T batch_eest = SQRT((T)(lock_err / count));                                              \
        double cells = (double)(B * n);                                                          \
        T num = safe_sqrt_##SUFFIX((T)(lock_dk / cells)), den = safe_sqrt_##SUFFIX((T)(lock_dg / cells)); \
        T batch_stiff = den > 0 ? num / den : (T)0;                                              \
        for (int64_t b = 0; b < B; ++b) {                                                        \
            eest_out[b] = running_out[b] ? batch_eest : inf;                                     \
            stiff_out[b] = batch_stiff;                                                          \
        }                                                                                        \
    }                                                                                            \
    /* Pass 2: acceptance, the controller (controller.PIController.propose) and return codes. */ \
    const T one = 1, q_lo = (T)1 / qmax, q_hi = (T)1 / qmin, floor_err = (T)1e-4;               \
    /* (pow is most of this pass's time: lockstep samples share e and mostly errold) */          \
    T last_e = NAN, last_q11 = NAN, last_errold = NAN, last_pow_errold = NAN;                    \
    int64_t still_running = 0;                                                                   \
    for (int64_t b = 0; b < B; ++b) {                                                            \
        int active = status[b] == code_running;                                                  \
        if (!active) {                   /* (a stopped sample keeps everything) */               \
            tau_out[b] = tau[b]; dt_out[b] = dt[b]; errold_out[b] = errold[b];                   \
            for (int64_t i = 0; i < n; ++i) { y_out[b * n + i] = y[b * n + i]; k1_out[b * n + i] = k1[b * n + i]; } \
            status_out[b] = status[b]; running_out[b] = 0; accept_out[b] = 0;                    \
            continue;                                                                            \
        }                                                                                        \
        T e = eest_out[b];                                                                       \
        int finite_y1 = accept_out[b];            /* active && y1 finite, from pass 1 */         \
        int accept = finite_y1 && e <= one;                                                      \
        int finishing = hit[b] && accept;                                                        \
        tau_out[b] = accept ? t_end[b] : tau[b];                                                 \
        for (int64_t i = 0; i < n; ++i) {                                                        \
            int64_t el = b * n + i;                                                              \
            y_out[el] = accept ? y1[el] : y[el];                                                 \
            k1_out[el] = accept ? f_end[el] : k1[el];                                            \
        }                                                                                        \
        int finite_e = e < inf;                                                                  \
        if (!(e == last_e)) { last_e = e; last_q11 = POW(e, beta1); }                             \
        if (!(errold[b] == last_errold)) { last_errold = errold[b]; last_pow_errold = POW(errold[b], beta2); } \
        T q11 = last_q11;                                                                        \
        T q = q11 / last_pow_errold / gamma;                                                     \
        q = q < q_lo ? q_lo : (q > q_hi ? q_hi : q);                                            \
        if (beta1 <= 0 && e == 0) q = q_lo;                                                      \
        if (!(qsteady_min == 1 && qsteady_max == 1) && q >= qsteady_min && q <= qsteady_max) q = one; \
        T q_reject = q11 / gamma;                                                                \
        q_reject = q_reject > q_hi ? q_hi : q_reject;                                            \
        T dt_new = h[b] / (accept ? q : q_reject);                                               \
        if (!finite_e) dt_new = h[b] * qmin;                                                     \
        errold_out[b] = accept ? (e < floor_err ? floor_err : e) : errold[b];                    \
        if (finishing) dt_new = NAN_MAX(dt_new, dt[b]);                                          \
        dt_new = NAN_MIN(dt_new, dtmax[b]);                                                      \
        /* controller.step_floor: one ulp of max(|τ|, 1) (and at least the user's dtmin) */      \
        T dtmin = step_floor_##SUFFIX(tau[b]);                                                   \
        if (dtmin_opt > 0 && dtmin < dtmin_opt) dtmin = dtmin_opt;                               \
        int stalled = !accept && (tau[b] + dt_new == t_end[b]);                                  \
        int too_small = (active ^ finishing) && ((dt_new < dtmin) || stalled);                   \
        int64_t code = status[b];                                                                \
        if (too_small) code = e < inf ? code_dtmin : code_unstable;                              \
        dt_out[b] = active ? dt_new : dt[b];                                                     \
        if (lockstep && active && !finite_y1) code = code_unstable;                              \
        if (finishing) code = code_success;                                                      \
        status_out[b] = code;                                                                    \
        running_out[b] = (uint8_t)(code == code_running);                                        \
        still_running += code == code_running;                                                   \
        accept_out[b] = (uint8_t)accept;                                                         \
        if (c->ys && accept)                                                                     \
            save_##SUFFIX(c, b, y, y1, f_end, ks, tau[b], h[b], t_end[b]);                       \
    }                                                                                            \
    return still_running;                                                                        \
}

DEFINE_RK_STEP(double, f64, sqrt, pow, nextafter, fma, (double)INFINITY)
DEFINE_RK_STEP(float, f32, sqrtf, powf, nextafterf, fmaf, (float)INFINITY)
