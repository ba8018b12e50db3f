// Shared helpers of the 2D selective scan kernels (DESIGN.md §2).
//
// Compiled by NVRTC at run time (through CuPy) and by nvcc in CI; no CUDA header is included, so the same text
// builds anywhere. The launcher in src/mamba2d/ops/cuda_build.py splices this file into scan2d.cu in place of its
// #include line, so CuPy's on-disk cache key covers every byte of the kernel source.
#pragma once

typedef long long m2d_i64;

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

#define M2D_FULL 0xffffffffu
// Rows of a band held in registers by each thread (must match ROWS_PER_BAND in cuda_build.py).
#ifndef M2D_R
#define M2D_R 4
#endif
// Largest block (must match MAX_THREADS in cuda_build.py) and occupancy targets that cap the registers.
#define M2D_MAX_THREADS 256
#ifndef M2D_FWD_MIN_BLOCKS
#define M2D_FWD_MIN_BLOCKS 4
#endif
#ifndef M2D_BWD_MIN_BLOCKS
#define M2D_BWD_MIN_BLOCKS 2
#endif

// softplus with PyTorch's threshold (beta = 1, threshold = 20) and its derivative, without log1pf's long path:
// softplus(v) = max(v, 0) + log1p(w), w = exp(-|v|) in (0, 1], and log1p(w) = 2 atanh(s), s = w / (2 + w) <= 1/3,
// summed to s^13 (truncation < 2e-8 relative).
__device__ __forceinline__ float m2d_softplus(float v) {
    if (v > 20.f) return v;
    const float w = expf(-fabsf(v));
    const float s = __fdividef(w, 2.f + w);
    const float s2 = s * s;
    float p = fmaf(s2, 1.f / 13.f, 1.f / 11.f);
    p = fmaf(s2, p, 1.f / 9.f);
    p = fmaf(s2, p, 1.f / 7.f);
    p = fmaf(s2, p, 1.f / 5.f);
    p = fmaf(s2, p, 1.f / 3.f);
    p = fmaf(s2, p, 1.f);
    return fmaxf(v, 0.f) + 2.f * s * p;
}
__device__ __forceinline__ float m2d_softplus_grad(float v) {
    if (v > 20.f) return 1.f;
    const float w = expf(-fabsf(v));
    const float r = __fdividef(1.f, 1.f + w);
    return v >= 0.f ? r : w * r;
}
#define M2D_LOG2E 1.4426950408889634f
// exp(x) as exp2(x * log2 e): the caller folds log2 e into A once per state (2 ulp + the product's rounding).
__device__ __forceinline__ float m2d_exp2(float x) { return exp2f(x); }
__device__ __forceinline__ float m2d_sigmoid(float v) { return __fdividef(1.f, 1.f + expf(-v)); }

// Everything a thread needs to know about its place in the block (see cuda_build.launch_config).
//   A block owns CH channel slots of one (batch, group); a slot owns TWs = S * WPM consecutive columns of a tile,
//   one column per thread. S < 32 packs 32 / S slots into a warp (narrow maps); WPM > 1 spreads one slot over
//   several warps (wide maps). Columns wider than TWs are walked tile by tile with a per-row carry in global memory.
struct M2DCtx {
    int tid, nthr, lane, S, WPM, CH, TWs, slot, col, seg, wim;
    int dim, dg, G, N, H, W, b, g, chunk, ntiles, nbands;
    bool slot_ok, xcarry;
};

__device__ __forceinline__ M2DCtx m2d_make_ctx(int dim, int H, int W, int G, int N, int S, int WPM, int CH,
                                               int ntiles, int nbands) {
    M2DCtx c;
    c.tid = threadIdx.x;
    c.nthr = blockDim.x;
    c.lane = c.tid & 31;
    c.S = S;
    c.WPM = WPM;
    c.CH = CH;
    c.TWs = S * WPM;
    c.slot = c.tid / c.TWs;
    c.col = c.tid - c.slot * c.TWs;
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
    c.xcarry = (WPM > 1) || (ntiles > 1);
    return c;
}

// Inclusive forward scan along the row (increasing q) of v[r] = a[r] * v_left + v[r] for the M2D_R rows of a band,
// across the lanes of a slot, then across its warps and tiles. Tile carries (the running value just left of the
// tile, per slot, state and row) live in ckh[((map * ntiles + tile) * N + n) * H + p]; write_ckh stores the carry
// for the next tile. Must be called by every thread of the block (it may synchronise).
__device__ __forceinline__ void m2d_rowscan_fwd(const M2DCtx& c, const float (&a)[M2D_R], float (&v)[M2D_R],
                                                float* aggM, float* aggV, float* cinb, float* ckh, bool write_ckh,
                                                int tile, int n, int p0) {
    float m[M2D_R];
#pragma unroll
    for (int r = 0; r < M2D_R; ++r) m[r] = a[r];
    for (int off = 1; off < c.S; off <<= 1) {
#pragma unroll
        for (int r = 0; r < M2D_R; ++r) {
            const float mo = __shfl_up_sync(M2D_FULL, m[r], off, c.S);
            const float vo = __shfl_up_sync(M2D_FULL, v[r], off, c.S);
            if (c.seg >= off) {
                v[r] = fmaf(m[r], vo, v[r]);
                m[r] *= mo;
            }
        }
    }
    if (!c.xcarry) return;
    if (c.seg == c.S - 1) {
#pragma unroll
        for (int r = 0; r < M2D_R; ++r) {
            aggM[(c.slot * c.WPM + c.wim) * M2D_R + r] = m[r];
            aggV[(c.slot * c.WPM + c.wim) * M2D_R + r] = v[r];
        }
    }
    __syncthreads();
    if (c.tid < c.CH * M2D_R) {
        const int s = c.tid / M2D_R, r = c.tid - s * M2D_R, p = p0 + r;
        const int chan = c.chunk * c.CH + s;
        const bool ok = chan < c.dg && p < c.H;
        const m2d_i64 map = (m2d_i64)c.b * c.dim + (m2d_i64)c.g * c.dg + chan;
        float carry = 0.f;
        if (ok && tile > 0) carry = ckh[((map * c.ntiles + tile) * c.N + n) * c.H + p];
        for (int w = 0; w < c.WPM; ++w) {
            const int k = (s * c.WPM + w) * M2D_R + r;
            cinb[k] = carry;
            carry = fmaf(aggM[k], carry, aggV[k]);
        }
        if (ok && write_ckh && tile + 1 < c.ntiles) ckh[((map * c.ntiles + tile + 1) * c.N + n) * c.H + p] = carry;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < M2D_R; ++r) v[r] = fmaf(m[r], cinb[(c.slot * c.WPM + c.wim) * M2D_R + r], v[r]);
}

// Reverse (decreasing q) adjoint scan along the row: out[q] = x[q] + t[q+1] with t[q] = a[q] * (x[q] + t[q+1]).
// The carry between tiles (t at the first column of the tile to the right) lives in dck[(map * N + n) * H + p].
__device__ __forceinline__ void m2d_rowscan_rev(const M2DCtx& c, const float (&a)[M2D_R], const float (&x)[M2D_R],
                                                float (&out)[M2D_R], float* aggM, float* aggV, float* cinb,
                                                float* dck, int tile, int n, int p0) {
    float m[M2D_R], v[M2D_R], cin[M2D_R];
#pragma unroll
    for (int r = 0; r < M2D_R; ++r) {
        m[r] = a[r];
        v[r] = a[r] * x[r];
        cin[r] = 0.f;
    }
    for (int off = 1; off < c.S; off <<= 1) {
#pragma unroll
        for (int r = 0; r < M2D_R; ++r) {
            const float mo = __shfl_down_sync(M2D_FULL, m[r], off, c.S);
            const float vo = __shfl_down_sync(M2D_FULL, v[r], off, c.S);
            if (c.seg + off < c.S) {
                v[r] = fmaf(m[r], vo, v[r]);
                m[r] *= mo;
            }
        }
    }
    if (c.xcarry) {
        if (c.seg == 0) {
#pragma unroll
            for (int r = 0; r < M2D_R; ++r) {
                aggM[(c.slot * c.WPM + c.wim) * M2D_R + r] = m[r];
                aggV[(c.slot * c.WPM + c.wim) * M2D_R + r] = v[r];
            }
        }
        __syncthreads();
        if (c.tid < c.CH * M2D_R) {
            const int s = c.tid / M2D_R, r = c.tid - s * M2D_R, p = p0 + r;
            const int chan = c.chunk * c.CH + s;
            const bool ok = chan < c.dg && p < c.H;
            const m2d_i64 map = (m2d_i64)c.b * c.dim + (m2d_i64)c.g * c.dg + chan;
            float carry = 0.f;
            if (ok && tile + 1 < c.ntiles) carry = dck[(map * c.N + n) * c.H + p];
            for (int w = c.WPM - 1; w >= 0; --w) {
                const int k = (s * c.WPM + w) * M2D_R + r;
                cinb[k] = carry;
                carry = fmaf(aggM[k], carry, aggV[k]);
            }
            if (ok && tile > 0) dck[(map * c.N + n) * c.H + p] = carry;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < M2D_R; ++r) cin[r] = cinb[(c.slot * c.WPM + c.wim) * M2D_R + r];
    }
#pragma unroll
    for (int r = 0; r < M2D_R; ++r) {
        const float t = fmaf(m[r], cin[r], v[r]);
        float tn = __shfl_down_sync(M2D_FULL, t, 1, c.S);
        if (c.seg == c.S - 1) tn = cin[r];
        out[r] = x[r] + tn;
    }
}
