/* Batched LU with partial pivoting for many small dense systems on the CPU (native_lu.py builds
 * and loads this file; it needs no headers beyond the C library).
 *
 * Why: torch.linalg.lu_factor_ex / lu_solve call LAPACK once per matrix. For a batch of 256
 * systems of size 20 that is 256 short calls per factorisation and per solve, dominated by call
 * overhead. Here the batch is the innermost (contiguous) dimension of the factors, so every
 * arithmetic loop runs over the batch and the compiler vectorises it.
 *
 * Layout: the factors of sample b, entry (i, j), live at LU[(i*n + j)*B + b]; pivots at
 * piv[k*B + b] (the row swapped with row k at elimination step k, as LAPACK's ipiv but 0-based).
 * Inputs and outputs of the entry points are (B, n, n) and (B, n) row-major.
 *
 * The pivot is LAPACK's choice (the first entry of largest magnitude in the column), so the factors
 * agree with LAPACK's to rounding. A zero pivot marks the sample singular (ok[b] = 0): its
 * factors become the identity's, so that nothing non-finite is produced.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define DEFINE_SMALL_LU(T, SUFFIX)                                                               \
void small_lu_factor_##SUFFIX(const T *src, T *lu, int64_t *piv, uint8_t *ok, int64_t B,        \
                              int64_t n) {                                                       \
    T *best_abs = malloc(sizeof(T) * B);                                                         \
    int64_t *best_row = malloc(sizeof(int64_t) * B);                                             \
    for (int64_t e = 0; e < n * n; ++e)                                                          \
        for (int64_t b = 0; b < B; ++b) lu[e * B + b] = src[b * n * n + e];                      \
    for (int64_t b = 0; b < B; ++b) ok[b] = 1;                                                   \
    for (int64_t k = 0; k < n; ++k) {                                                            \
        T *row_k = lu + k * n * B;                                                               \
        for (int64_t b = 0; b < B; ++b) { best_abs[b] = fabs(row_k[k * B + b]); best_row[b] = k; } \
        for (int64_t i = k + 1; i < n; ++i) {                                                    \
            const T *entry = lu + (i * n + k) * B;                                               \
            for (int64_t b = 0; b < B; ++b) {                                                    \
                T v = fabs(entry[b]);                                                            \
                int bigger = v > best_abs[b];                                                    \
                best_abs[b] = bigger ? v : best_abs[b];                                          \
                best_row[b] = bigger ? i : best_row[b];                                          \
            }                                                                                    \
        }                                                                                        \
        for (int64_t b = 0; b < B; ++b) {                                                        \
            int64_t p = best_row[b];                                                             \
            piv[k * B + b] = p;                                                                  \
            if (p != k)                                                                          \
                for (int64_t j = 0; j < n; ++j) {                                                \
                    T *a = row_k + j * B + b, *c = lu + (p * n + j) * B + b;                     \
                    T tmp = *a; *a = *c; *c = tmp;                                               \
                }                                                                                \
        }                                                                                        \
        T *pivot = row_k + k * B;                                                                \
        for (int64_t b = 0; b < B; ++b)                                                          \
            if (best_abs[b] == 0) { ok[b] = 0; pivot[b] = 1; }                                   \
        for (int64_t i = k + 1; i < n; ++i) {                                                    \
            T *row_i = lu + i * n * B, *mult = row_i + k * B;                                    \
            for (int64_t b = 0; b < B; ++b) mult[b] /= pivot[b];                                 \
            for (int64_t j = k + 1; j < n; ++j) {                                                \
                T *a = row_i + j * B; const T *c = row_k + j * B;                                \
                for (int64_t b = 0; b < B; ++b) a[b] -= mult[b] * c[b];                          \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
    for (int64_t b = 0; b < B; ++b)          /* a singular sample solves with the identity */    \
        if (!ok[b]) {                                                                            \
            for (int64_t e = 0; e < n * n; ++e) lu[e * B + b] = (e % (n + 1) == 0);              \
            for (int64_t k = 0; k < n; ++k) piv[k * B + b] = k;                                  \
        }                                                                                        \
    free(best_abs); free(best_row);                                                              \
}                                                                                                \
                                                                                                 \
/* x = M⁻¹ r, or M⁻ᵀ r when transpose (for gradients), with P M = L U from small_lu_factor. */   \
void small_lu_solve_##SUFFIX(const T *lu, const int64_t *piv, const T *r, T *x, int64_t B,      \
                             int64_t n, int transpose) {                                         \
    T *v = malloc(sizeof(T) * n * B);                                                            \
    for (int64_t i = 0; i < n; ++i)                                                              \
        for (int64_t b = 0; b < B; ++b) v[i * B + b] = r[b * n + i];                             \
    if (!transpose) {                                                                            \
        for (int64_t k = 0; k < n; ++k)                /* P r, in the order of the swaps */      \
            for (int64_t b = 0; b < B; ++b) {                                                    \
                int64_t p = piv[k * B + b];                                                      \
                if (p != k) { T tmp = v[k * B + b]; v[k * B + b] = v[p * B + b]; v[p * B + b] = tmp; } \
            }                                                                                    \
        for (int64_t i = 1; i < n; ++i)                /* L z = P r, L unit lower */             \
            for (int64_t j = 0; j < i; ++j) {                                                    \
                const T *l = lu + (i * n + j) * B; const T *vj = v + j * B; T *vi = v + i * B;   \
                for (int64_t b = 0; b < B; ++b) vi[b] -= l[b] * vj[b];                           \
            }                                                                                    \
        for (int64_t i = n - 1; i >= 0; --i) {         /* U x = z */                             \
            T *vi = v + i * B;                                                                   \
            for (int64_t j = i + 1; j < n; ++j) {                                                \
                const T *u = lu + (i * n + j) * B; const T *vj = v + j * B;                      \
                for (int64_t b = 0; b < B; ++b) vi[b] -= u[b] * vj[b];                           \
            }                                                                                    \
            const T *d = lu + (i * n + i) * B;                                                   \
            for (int64_t b = 0; b < B; ++b) vi[b] /= d[b];                                       \
        }                                                                                        \
    } else {                                           /* Mᵀ = Uᵀ Lᵀ P */                        \
        for (int64_t i = 0; i < n; ++i) {              /* Uᵀ w = r, Uᵀ lower */                  \
            T *vi = v + i * B;                                                                   \
            for (int64_t j = 0; j < i; ++j) {                                                    \
                const T *u = lu + (j * n + i) * B; const T *vj = v + j * B;                      \
                for (int64_t b = 0; b < B; ++b) vi[b] -= u[b] * vj[b];                           \
            }                                                                                    \
            const T *d = lu + (i * n + i) * B;                                                   \
            for (int64_t b = 0; b < B; ++b) vi[b] /= d[b];                                       \
        }                                                                                        \
        for (int64_t i = n - 2; i >= 0; --i)           /* Lᵀ z = w, Lᵀ unit upper */             \
            for (int64_t j = i + 1; j < n; ++j) {                                                \
                const T *l = lu + (j * n + i) * B; const T *vj = v + j * B; T *vi = v + i * B;   \
                for (int64_t b = 0; b < B; ++b) vi[b] -= l[b] * vj[b];                           \
            }                                                                                    \
        for (int64_t k = n - 1; k >= 0; --k)           /* x = Pᵀ z: the swaps in reverse */      \
            for (int64_t b = 0; b < B; ++b) {                                                    \
                int64_t p = piv[k * B + b];                                                      \
                if (p != k) { T tmp = v[k * B + b]; v[k * B + b] = v[p * B + b]; v[p * B + b] = tmp; } \
            }                                                                                    \
    }                                                                                            \
    for (int64_t b = 0; b < B; ++b)                                                              \
        for (int64_t i = 0; i < n; ++i) x[b * n + i] = v[i * B + b];                             \
    free(v);                                                                                     \
}

DEFINE_SMALL_LU(double, f64)
DEFINE_SMALL_LU(float, f32)
