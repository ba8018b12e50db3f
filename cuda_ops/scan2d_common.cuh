// Shared helpers of the 2D selective scan kernels (contract: docs/scan.md).
//
// Compiled by NVRTC at run time (through CuPy) and by nvcc in CI; no CUDA header is included, so the same text
// builds anywhere. The launcher (src/mamba2d/ops/cuda_build.py) splices this file, and the parameter structs it
// includes, into scan2d_band.cu, scan2d_wave.cu, layer_norm.cu and layout.cu in place of their #include lines, so
// CuPy's on-disk cache key covers every byte of each kernel source.
#pragma once

#include "scan2d_params.cuh"

// 16-bit storage types: raw bits, converted with PTX cvt (sm_80+ for bf16).
struct m2d_half {
    unsigned short x;
};
struct m2d_bf16 {
    unsigned short x;
};

__device__ __forceinline__ float m2d_to_f(float v) { return v; }
__device__ __forceinline__ float m2d_to_f(m2d_half v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x));
    return f;
}
__device__ __forceinline__ float m2d_to_f(m2d_bf16 v) { return __uint_as_float(((unsigned int)v.x) << 16); }

template <typename T>
__device__ __forceinline__ T m2d_from_f(float v);
template <>
__device__ __forceinline__ float m2d_from_f<float>(float v) {
    return v;
}
template <>
__device__ __forceinline__ m2d_half m2d_from_f<m2d_half>(float v) {
    m2d_half r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.x) : "f"(v));
    return r;
}
template <>
__device__ __forceinline__ m2d_bf16 m2d_from_f<m2d_bf16>(float v) {
    m2d_bf16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.x) : "f"(v));
    return r;
}

// The pointer p, opaque to the compiler's reassociation: indexing it by a 32-bit in-map offset then costs one wide
// multiply-add per element, instead of re-adding the (batch, channel) offset in 64 bits and scaling every time.
#ifndef M2D_LEAN
#define M2D_LEAN 1
#endif
template <typename P>
__device__ __forceinline__ P* m2d_base(P* p) {
#if M2D_LEAN
    unsigned long long v = reinterpret_cast<unsigned long long>(p);
    asm("mov.b64 %0, %0;" : "+l"(v));
    return reinterpret_cast<P*>(v);
#else
    return p;
#endif
}

// The forward issues a band's loads of u, delta, B and C one band ahead (in registers), so that they are in flight
// while the band before is scanned: on rows of one warp with few states (MINB = 3), for float32 inputs and for
// 16-bit inputs with one column per thread (maps 17-32 wide). Narrow maps, 16-bit inputs with 2 or 4 columns per
// thread and the many-state forward keep their loads at the top of their own band: the extra registers spill there
// and cost more than the hidden latency saves. 0: nowhere.
#ifndef M2D_FWD_AHEAD
#define M2D_FWD_AHEAD 1
#endif
// Bands of at most this many rows ask the L1 cache for the next band's rows before they are scanned (0: never). A
// one-row band has little independent work to hide its loads behind, and the prefetch roughly halves its load
// stalls; bands of 2 or 4 rows keep R loads in flight per thread already, and there the prefetch instructions cost
// more issue slots than they save.
#ifndef M2D_PREFETCH
#define M2D_PREFETCH 1
#endif
// The backward of float32 inputs on rows of one warp prefetches bands of up to this many rows; narrow maps, wide
// rows and 16-bit inputs keep M2D_PREFETCH (the prefetch does not pay for its issue slots there).
#ifndef M2D_PREFETCH_BWD_F32
#define M2D_PREFETCH_BWD_F32 2
#endif
// Hint the L1 cache to fetch the rows of a band one band ahead (one address per row: a thread's K columns share a
// cache line), so that the band's loads, issued when it is scanned, find their data close by; costs no registers.
template <typename T, int R, int MAXR = M2D_PREFETCH>
__device__ __forceinline__ void m2d_prefetch_rows(const T* p, int st, int nrow) {
    if constexpr (R <= MAXR) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (r < nrow) asm volatile("prefetch.global.L1 [%0];" ::"l"(p + r * st));
        }
    }
}

#define M2D_FULL 0xffffffffu
// n rounded up to a multiple of 4 (shared-memory offsets in floats that K-wide vector accesses follow).
#define M2D_PAD4(n) (((n) + 3) & ~3)
// Default rows of a band held in registers per thread for one column per thread (must match ROWS_PER_BAND in
// cuda_build.py); the kernels take rows per band R and columns per thread K as template arguments.
#ifndef M2D_R
#define M2D_R 4
#endif
// Largest block (must match MAX_THREADS in cuda_build.py) and occupancy targets that cap the registers (the forward
// takes its target as a template argument, chosen by cuda_build.launch_config).
#define M2D_MAX_THREADS 256
#ifndef M2D_RED_DBUF
#define M2D_RED_DBUF 1
#endif
// The backward of narrow maps runs blocks of at most M2D_NARROW_BWD_MAX_THREADS (must match NARROW_BWD_MAX_THREADS in
// cuda_build.py) and asks for 5 of them an SM: 96 registers a thread (a few spilled) instead of 128, 20 warps an SM
// instead of 16 for a latency-bound kernel (6 blocks, 80 registers, spill too much).
#define M2D_NARROW_BWD_MAX_THREADS 128
#ifndef M2D_NARROW_BWD_MIN_BLOCKS
#define M2D_NARROW_BWD_MIN_BLOCKS 5
#endif
#ifndef M2D_BWD_MIN_BLOCKS
#define M2D_BWD_MIN_BLOCKS 2
#endif

// a ? x : y as one SEL: the compiler cannot turn it back into a branch around the unused side (it did for softplus,
// costing a divergence barrier per pixel).
__device__ __forceinline__ float m2d_select(bool a, float x, float y) {
    float r;
    asm("{\n\t.reg .pred p;\n\tsetp.ne.u32 p, %1, 0;\n\tselp.f32 %0, %2, %3, p;\n\t}"
        : "=f"(r)
        : "r"((unsigned)a), "f"(x), "f"(y));
    return r;
}
#define M2D_LOG2E 1.4426950408889634f
// exp(-x) for x >= 0 as exp2(-x log2 e): one MUFU instead of expf's exact range reduction; the product's rounding
// adds at most x * 2^-24 relative error, far inside the 1e-5 float32 bound for |x| <= 20 where it matters.
__device__ __forceinline__ float m2d_exp_neg(float x) { return exp2f(-x * M2D_LOG2E); }

// softplus with PyTorch's threshold (beta = 1, threshold = 20) and its derivative, without log1pf's long path
// (exp(-|v|) stays finite for any v, so both sides of the threshold are computed and one is selected):
// softplus(v) = max(v, 0) + log1p(w), w = exp(-|v|) in (0, 1], and log1p(w) = 2 atanh(s), s = w / (2 + w) <= 1/3,
// summed to s^13 (truncation < 2e-8 relative).
__device__ __forceinline__ float m2d_softplus(float v) {
    const float w = m2d_exp_neg(fabsf(v));
    const float s = __fdividef(w, 2.f + w);
    const float s2 = s * s;
    float p = fmaf(s2, 1.f / 13.f, 1.f / 11.f);
    p = fmaf(s2, p, 1.f / 9.f);
    p = fmaf(s2, p, 1.f / 7.f);
    p = fmaf(s2, p, 1.f / 5.f);
    p = fmaf(s2, p, 1.f / 3.f);
    p = fmaf(s2, p, 1.f);
    return m2d_select(v > 20.f, v, fmaxf(v, 0.f) + 2.f * s * p);
}
// softplus(v) and its derivative from one exponential (the backward keeps the derivative for d(delta)).
__device__ __forceinline__ float m2d_softplus_with_grad(float v, float& grad) {
    const float w = m2d_exp_neg(fabsf(v));
    const float s = __fdividef(w, 2.f + w);
    const float s2 = s * s;
    float p = fmaf(s2, 1.f / 13.f, 1.f / 11.f);
    p = fmaf(s2, p, 1.f / 9.f);
    p = fmaf(s2, p, 1.f / 7.f);
    p = fmaf(s2, p, 1.f / 5.f);
    p = fmaf(s2, p, 1.f / 3.f);
    p = fmaf(s2, p, 1.f);
    const float r = __fdividef(1.f, 1.f + w);
    const bool linear = v > 20.f;
    grad = m2d_select(linear, 1.f, m2d_select(v >= 0.f, r, w * r));
    return m2d_select(linear, v, fmaxf(v, 0.f) + 2.f * s * p);
}
// exp(x) as exp2(x * log2 e): the caller folds log2 e into A once per state (2 ulp + the product's rounding).
__device__ __forceinline__ float m2d_exp2(float x) { return exp2f(x); }
__device__ __forceinline__ float m2d_sigmoid(float v) { return __fdividef(1.f, 1.f + exp2f(-v * M2D_LOG2E)); }

// K consecutive values of a map row as one aligned vector access (8 or 16 bytes for K = 2, 4 in float32).
template <typename P, int K>
struct alignas(sizeof(P) * K) m2d_vec {
    P e[K];
};

// A thread's K columns (scan-frame q .. q + K - 1) as memory columns, clamped into the map: every load reads a valid
// address without a branch, and the values outside the map are masked to zero with bit r * K + k of the band's valid
// mask (one select per value instead of a predicated block per pixel). Where W % K == 0 (`vout`: the outputs, which
// the launcher allocates contiguous) and also the inputs' strides and addresses allow it (`vin`), the K values are
// one vector access at memory column jv, their order reversed when the scan runs right to left (`rev`): one load
// instead of K, each using whole sectors.
template <int K>
struct M2DCols {
    int j[K];
    int jv;
    bool rev, vin, vout;
};
// vec: bit 0 the inputs allow vector loads, bit 1 the outputs vector stores (launcher's _vector_flags).
template <int K>
__device__ __forceinline__ M2DCols<K> m2d_columns(int q, int W, bool fc, int vec) {
    M2DCols<K> cols;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const int qq = min(q + k, W - 1);
        cols.j[k] = fc ? W - 1 - qq : qq;
    }
    cols.jv = max(0, min(W - K, fc ? W - K - q : q));  // aligned when W % K == 0 (q is a multiple of K)
    cols.rev = fc;
    cols.vin = K > 1 && (vec & 1);
    cols.vout = K > 1 && (vec & 2);
    return cols;
}
template <int R>
__device__ __forceinline__ void m2d_rows(int p0, int H, bool fr, int (&irow)[R]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int pp = min(p0 + r, H - 1);
        irow[r] = fr ? H - 1 - pp : pp;
    }
}
template <int R, int K>
__device__ __forceinline__ unsigned m2d_valid_mask(int nrow, int ncol) {
    unsigned m = 0;
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int k = 0; k < K; ++k) m |= (r < nrow && k < ncol) ? 1u << (r * K + k) : 0u;
    }
    return m;
}
__device__ __forceinline__ bool m2d_is_valid(unsigned mask, int bit) { return (mask >> bit) & 1u; }
// The band's values of a (.., H, W) map with in-map strides (sh, sw), as float, zero outside the map.
template <int R, int K, typename P>
__device__ __forceinline__ void m2d_load_band(const P* base, int sh, int sw, const int (&irow)[R],
                                              const M2DCols<K>& cols, unsigned valid, float (&out)[R][K]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int row = irow[r] * sh;
        float f[K];
        if (K > 1 && cols.vin) {
            const m2d_vec<P, K> v = *reinterpret_cast<const m2d_vec<P, K>*>(base + (row + cols.jv));
            float e[K];
#pragma unroll
            for (int k = 0; k < K; ++k) e[k] = m2d_to_f(v.e[k]);
#pragma unroll
            for (int k = 0; k < K; ++k) f[k] = m2d_select(cols.rev, e[K - 1 - k], e[k]);
        } else {
#pragma unroll
            for (int k = 0; k < K; ++k) f[k] = m2d_to_f(base[row + cols.j[k] * sw]);
        }
#pragma unroll
        for (int k = 0; k < K; ++k) out[r][k] = m2d_select(m2d_is_valid(valid, r * K + k), f[k], 0.f);
    }
}
// m2d_load_band in two steps, so that the loads can be issued a band ahead of their use: the raw values (a thread's
// K values of a row in memory order, as one vector: 16-bit values stay packed two to a register until unpacked),
// then as float in the thread's column order, zero outside the map.
template <int R, int K, typename P>
__device__ __forceinline__ void m2d_fetch_band(const P* base, int sh, int sw, const int (&irow)[R],
                                               const M2DCols<K>& cols, m2d_vec<P, K> (&raw)[R]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int row = irow[r] * sh;
        if (K > 1 && cols.vin) {
            raw[r] = *reinterpret_cast<const m2d_vec<P, K>*>(base + (row + cols.jv));
        } else {
#pragma unroll
            for (int k = 0; k < K; ++k) raw[r].e[k] = base[row + cols.j[k] * sw];
        }
    }
}
template <int R, int K, typename P>
__device__ __forceinline__ void m2d_unpack_band(const m2d_vec<P, K> (&raw)[R], const M2DCols<K>& cols,
                                                unsigned valid, float (&out)[R][K]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        float e[K], f[K];
#pragma unroll
        for (int k = 0; k < K; ++k) e[k] = m2d_to_f(raw[r].e[k]);
#pragma unroll
        for (int k = 0; k < K; ++k) f[k] = K > 1 && cols.vin ? m2d_select(cols.rev, e[K - 1 - k], e[k]) : e[k];
#pragma unroll
        for (int k = 0; k < K; ++k) out[r][k] = m2d_select(m2d_is_valid(valid, r * K + k), f[k], 0.f);
    }
}
// Store the band's values (those inside the map) into a contiguous (.., H, W) map.
template <int R, int K, typename P>
__device__ __forceinline__ void m2d_store_band(P* base, int W, const int (&irow)[R], const M2DCols<K>& cols,
                                               unsigned valid, const float (&val)[R][K]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int row = irow[r] * W;
        if (K > 1 && cols.vout) {
            if (m2d_is_valid(valid, r * K)) {  // W % K == 0: a thread's columns are all in the map or none
                m2d_vec<P, K> v;
#pragma unroll
                for (int k = 0; k < K; ++k) v.e[k] = m2d_from_f<P>(m2d_select(cols.rev, val[r][K - 1 - k], val[r][k]));
                *reinterpret_cast<m2d_vec<P, K>*>(base + (row + cols.jv)) = v;
            }
        } else {
#pragma unroll
            for (int k = 0; k < K; ++k) {
                if (m2d_is_valid(valid, r * K + k)) base[row + cols.j[k]] = m2d_from_f<P>(val[r][k]);
            }
        }
    }
}
// A thread's K values of a scan-frame row (a checkpoint row: columns q .. q + K - 1 of a W-wide float row, nk of
// them inside the map), read (zero outside) or written.
template <int K>
__device__ __forceinline__ void m2d_load_row(const float* row, int q, int W, int nk, bool vec, float (&v)[K]) {
    if (K > 1 && vec) {
        const m2d_vec<float, K> e = *reinterpret_cast<const m2d_vec<float, K>*>(row + min(q, W - K));
#pragma unroll
        for (int k = 0; k < K; ++k) v[k] = m2d_select(k < nk, e.e[k], 0.f);
    } else {
#pragma unroll
        for (int k = 0; k < K; ++k) v[k] = m2d_select(k < nk, row[min(q + k, W - 1)], 0.f);
    }
}
template <int K>
__device__ __forceinline__ void m2d_store_row(float* row, int q, int nk, bool vec, const float (&v)[K]) {
    if (K > 1 && vec) {
        if (nk > 0) {
            m2d_vec<float, K> e;
#pragma unroll
            for (int k = 0; k < K; ++k) e.e[k] = v[k];
            *reinterpret_cast<m2d_vec<float, K>*>(row + q) = e;
        }
    } else {
#pragma unroll
        for (int k = 0; k < K; ++k) {
            if (k < nk) row[q + k] = v[k];
        }
    }
}

// How a slot's row maps onto the block (template argument LAYOUT of the kernels, from cuda_build.LaunchConfig):
// narrow maps pack several slots into a warp (lanes per slot S < 32, a kernel argument); a warp row is one full warp
// (S = 32 known at compile time: unrolled lane scans); wide rows span several warps or tiles (cross-warp combine
// through shared memory, carries between tiles).
#define M2D_NARROW 0
#define M2D_WARP_ROW 1
#define M2D_WIDE 2

// Group g's direction code (cuda_build.direction_code): from the codes passed by value, or from dirs where the
// launcher could not pack them.
__device__ __forceinline__ int m2d_direction(const M2DScanParams& prm, int g) {
    if (prm.dirs != nullptr) return prm.dirs[g];
    return (int)((prm.dir_codes >> (3 * (g % prm.dir_period))) & 7);
}

// The offsets of group g's u and dout maps (M2DScanParams.su_g, so_g): whole periods of groups sharing maps.
__device__ __forceinline__ m2d_i64 m2d_u_offset(const M2DScanParams& prm, int g) {
    return (m2d_i64)(g - g % prm.u_period) * prm.su_g;
}
__device__ __forceinline__ m2d_i64 m2d_dout_offset(const M2DScanParams& prm, int g) {
    return (m2d_i64)(g - g % prm.o_period) * prm.so_g;
}

// Everything a thread needs to know about its place in the block (see cuda_build.launch_config).
//   A block owns CH channel slots of one (batch, group); a slot owns TWs = S * WPM * K consecutive columns of a
//   tile, K consecutive columns per thread (tps = S * WPM threads per slot). S < 32 packs 32 / S slots into a warp
//   (narrow maps); WPM > 1 spreads one slot over several warps (wide maps). Columns wider than TWs are walked tile
//   by tile with a per-row carry in global memory.
struct M2DCtx {
    int tid, nthr, lane, S, WPM, CH, tps, TWs, slot, col, seg, wim;
    int dim, dg, G, N, H, W, b, g, chunk, ntiles, nbands;
    bool slot_ok;
};

__device__ __forceinline__ M2DCtx m2d_make_ctx(int dim, int H, int W, int G, int N, int S, int WPM, int CH,
                                               int K, int ntiles, int nbands) {
    M2DCtx c;
    c.tid = threadIdx.x;
    c.nthr = blockDim.x;
    c.lane = c.tid & 31;
    c.S = S;
    c.WPM = WPM;
    c.CH = CH;
    c.tps = S * WPM;
    c.TWs = c.tps * K;
    c.slot = c.tid / c.tps;
    c.col = c.tid - c.slot * c.tps;
    c.seg = c.lane & (S - 1);
    c.wim = (WPM > 1) ? (c.col >> 5) : 0;
    c.dim = dim;
    c.G = G;
    c.dg = dim / G;
    c.N = N;
    c.H = H;
    c.W = W;
    const int cpg = (c.dg + CH - 1) / CH;
    const int bid = blockIdx.x;
    c.chunk = bid % cpg;
    const int bg = bid / cpg;
    c.g = bg % G;
    c.b = bg / G;
    c.slot_ok = c.chunk * CH + c.slot < c.dg;
    c.ntiles = ntiles;
    c.nbands = nbands;
    return c;
}

// Vertical pass of a band down each of the thread's K columns: v[r][k] = a[r][k] * carry + v[r][k], the carry (the
// state just above the band) updated to the band's last row.
template <int R, int K>
__device__ __forceinline__ void m2d_colscan_fwd(const float (&a)[R][K], float (&v)[R][K], float (&carry)[K]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
            carry[k] = fmaf(a[r][k], carry[k], v[r][k]);
            v[r][k] = carry[k];
        }
    }
}
// Reverse vertical adjoint pass, bottom row first: x[r][k] += t, t = a[r][k] * x[r][k] (t: the adjoint entering from
// the row below, updated to the one leaving the band's first row).
template <int R, int K>
__device__ __forceinline__ void m2d_colscan_rev(const float (&a)[R][K], float (&x)[R][K], float (&t)[K]) {
#pragma unroll
    for (int r = R - 1; r >= 0; --r) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
            x[r][k] += t[k];
            t[k] = a[r][k] * x[r][k];
        }
    }
}
template <int R, int K>
__device__ __forceinline__ void m2d_copy(const float (&from)[R][K], float (&to)[R][K]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int k = 0; k < K; ++k) to[r][k] = from[r][k];
    }
}

// Where the row carry between tiles of wide rows lives, for the thread that combines the warps' aggregates of slot
// s = tid / R, row p = p0 + tid % R, state n: ((map * tiles + 0) * N + n) * H + p, i.e. the index into dck
// (tiles = 1) or, plus tile * N * H, into ckh (tiles = ntiles). -1 for the other threads and outside the map.
__device__ __forceinline__ m2d_i64 m2d_carry_index(const M2DCtx& c, int n, int p0, int R, int tiles) {
    if (c.tid >= c.CH * R) return -1;
    const int s = c.tid / R, p = p0 + (c.tid - s * R);
    const int chan = c.chunk * c.CH + s;
    if (chan >= c.dg || p >= c.H) return -1;
    const m2d_i64 map = (m2d_i64)c.b * c.dim + (m2d_i64)c.g * c.dg + chan;
    return (map * tiles * c.N + n) * c.H + p;
}

// Inclusive forward scan along the row (increasing q) of v[r][k] = a[r][k] * v_left + v[r][k] for the R rows of a
// band and the K consecutive columns of the thread: a sequential scan over the thread's columns, then a lane scan of
// the per-thread aggregates across the slot, then across its warps and tiles. Tile carries (the running value just
// left of the tile, per slot, state and row) live in ckh[((map * ntiles + tile) * N + n) * H + p]; write_ckh stores
// the carry for the next tile. Must be called by every thread of the block (it may synchronise).
template <int R, int K, int LAYOUT>
__device__ __forceinline__ void m2d_rowscan_fwd(const M2DCtx& c, const float (&a)[R][K], float (&v)[R][K],
                                                float* aggM, float* aggV, float* cinb, float* ckh, bool write_ckh,
                                                int tile, int n, int p0) {
    const int S = LAYOUT == M2D_WARP_ROW ? 32 : c.S, seg = LAYOUT == M2D_WARP_ROW ? c.lane : c.seg;
    float pm[R][K];  // products of a over the thread's columns up to k
    float m[R], w[R], cin[R];
    // wide rows: the threads combining the warps' aggregates read the carry from the tile to the left now, so that
    // its global-memory latency hides behind the lane scan
    const m2d_i64 ckh_at = LAYOUT == M2D_WIDE ? m2d_carry_index(c, n, p0, R, c.ntiles) : -1;
    const float tile_in = (ckh_at >= 0 && tile > 0) ? ckh[ckh_at + (m2d_i64)tile * c.N * c.H] : 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        pm[r][0] = a[r][0];
#pragma unroll
        for (int k = 1; k < K; ++k) {
            v[r][k] = fmaf(a[r][k], v[r][k - 1], v[r][k]);
            pm[r][k] = pm[r][k - 1] * a[r][k];
        }
        m[r] = pm[r][K - 1];
        w[r] = v[r][K - 1];
        cin[r] = 0.f;
    }
    for (int off = 1; off < S; off <<= 1) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float mo = __shfl_up_sync(M2D_FULL, m[r], off, S);
            const float vo = __shfl_up_sync(M2D_FULL, w[r], off, S);
            if (seg >= off) {
                w[r] = fmaf(m[r], vo, w[r]);
                m[r] *= mo;
            }
        }
    }
    if (LAYOUT == M2D_WIDE) {
        if (seg == S - 1) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
                aggM[(c.slot * c.WPM + c.wim) * R + r] = m[r];
                aggV[(c.slot * c.WPM + c.wim) * R + r] = w[r];
            }
        }
        __syncthreads();
        if (c.tid < c.CH * R) {
            const int s = c.tid / R, r = c.tid - s * R;
            float carry = tile_in;
            for (int wi = 0; wi < c.WPM; ++wi) {
                const int k = (s * c.WPM + wi) * R + r;
                cinb[k] = carry;
                carry = fmaf(aggM[k], carry, aggV[k]);
            }
            if (ckh_at >= 0 && write_ckh && tile + 1 < c.ntiles) ckh[ckh_at + (m2d_i64)(tile + 1) * c.N * c.H] = carry;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < R; ++r) {
            cin[r] = cinb[(c.slot * c.WPM + c.wim) * R + r];
            w[r] = fmaf(m[r], cin[r], w[r]);
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (K > 1) {
            // Value entering the thread: the inclusive aggregate of the lane to the left (the carry for lane 0).
            float e = __shfl_up_sync(M2D_FULL, w[r], 1, S);
            if (seg == 0) e = cin[r];
#pragma unroll
            for (int k = 0; k < K - 1; ++k) v[r][k] = fmaf(pm[r][k], e, v[r][k]);
        }
        v[r][K - 1] = w[r];
    }
}

// Reverse (decreasing q) adjoint scan along the row: out[q] = x[q] + t[q+1] with t[q] = a[q] * (x[q] + t[q+1]).
// Per thread t over its K columns is affine in the t entering from the right (tm * t_in + tv); the aggregates are
// scanned across lanes, warps and tiles as in the forward. The carry between tiles (t at the first column of the
// tile to the right) lives in dck[(map * N + n) * H + p].
template <int R, int K, int LAYOUT>
__device__ __forceinline__ void m2d_rowscan_rev(const M2DCtx& c, const float (&a)[R][K], const float (&x)[R][K],
                                                float (&out)[R][K], float* aggM, float* aggV, float* cinb,
                                                float* dck, int tile, int n, int p0) {
    const int S = LAYOUT == M2D_WARP_ROW ? 32 : c.S, seg = LAYOUT == M2D_WARP_ROW ? c.lane : c.seg;
    float tm[R][K], tv[R][K], m[R], v[R], cin[R];
    // wide rows: the carry from the tile to the right is read before the lane scan (latency hidden), as forward
    const m2d_i64 dck_at = LAYOUT == M2D_WIDE ? m2d_carry_index(c, n, p0, R, 1) : -1;
    const float tile_in = (dck_at >= 0 && tile + 1 < c.ntiles) ? dck[dck_at] : 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        tm[r][K - 1] = a[r][K - 1];
        tv[r][K - 1] = a[r][K - 1] * x[r][K - 1];
#pragma unroll
        for (int k = K - 2; k >= 0; --k) {
            tv[r][k] = a[r][k] * (x[r][k] + tv[r][k + 1]);
            tm[r][k] = a[r][k] * tm[r][k + 1];
        }
        m[r] = tm[r][0];
        v[r] = tv[r][0];
        cin[r] = 0.f;
    }
    for (int off = 1; off < S; off <<= 1) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float mo = __shfl_down_sync(M2D_FULL, m[r], off, S);
            const float vo = __shfl_down_sync(M2D_FULL, v[r], off, S);
            if (seg + off < S) {
                v[r] = fmaf(m[r], vo, v[r]);
                m[r] *= mo;
            }
        }
    }
    if (LAYOUT == M2D_WIDE) {
        if (seg == 0) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
                aggM[(c.slot * c.WPM + c.wim) * R + r] = m[r];
                aggV[(c.slot * c.WPM + c.wim) * R + r] = v[r];
            }
        }
        __syncthreads();
        if (c.tid < c.CH * R) {
            const int s = c.tid / R, r = c.tid - s * R;
            float carry = tile_in;
            for (int wi = c.WPM - 1; wi >= 0; --wi) {
                const int k = (s * c.WPM + wi) * R + r;
                cinb[k] = carry;
                carry = fmaf(aggM[k], carry, aggV[k]);
            }
            if (dck_at >= 0 && tile > 0) dck[dck_at] = carry;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < R; ++r) cin[r] = cinb[(c.slot * c.WPM + c.wim) * R + r];
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const float t = fmaf(m[r], cin[r], v[r]);  // t at the thread's first column
        float tn = __shfl_down_sync(M2D_FULL, t, 1, S);
        if (seg == S - 1) tn = cin[r];  // t entering from the right
        out[r][K - 1] = x[r][K - 1] + tn;
#pragma unroll
        for (int k = 0; k < K - 1; ++k) out[r][k] = x[r][k] + fmaf(tm[r][k + 1], tn, tv[r][k + 1]);
    }
}
