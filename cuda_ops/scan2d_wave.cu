// 2D selective scan (contract: docs/scan.md): the wavefront forward and backward kernels, for few, large maps with
// many states (a slide's grid in 2DMambaMIL: one 200 x 300 map per channel, 16 states). The launcher picks them or
// the per-band kernels (scan2d_band.cu) per call: mamba2d.ops.cuda_build.uses_wave.
#include "scan2d_common.cuh"

// The per-band kernels spend most of a pixel's instructions on the lane scan along the row (five
// shuffle steps and a cross-warp combine per state and row); here no pass needs a parallel scan. A warp owns 32
// consecutive scan-frame rows of one map (a band), lane r one row, and walks the columns with lane r lagging r steps
// behind lane 0: at step t lane r holds pixel (p0 + r, t - r), so the row recurrence is the lane's own running value
// and the vertical one needs only the value lane r - 1 computed a step earlier (one shuffle per pixel and state; lane
// 0 takes the band above's last row, kept in `tops`). The block is one map; warp w owns states w * NS .. w * NS +
// NS - 1 (all NS at once: independent chains per step), and sums over states are added in shared memory in a fixed
// order. Per chunk of M2D_WAVE_T steps the block stages the skewed window of every input in shared memory with
// coalesced loads (lane r's pixels of the chunk lie along its own row) and writes its outputs from there coalesced.
// Each state is computed in the same order as the reference's sequential scans: bitwise reproducible, no atomics.
//
// Pixels outside the map (a lane's steps before its first or after its last column, rows past H) are staged as
// dt = 0 (Abar = 1) and zero inputs: their states and adjoints stay finite and never reach a written value.
#ifndef M2D_WAVE_T
#define M2D_WAVE_T 8
#endif
#define M2D_WAVE_TP (M2D_WAVE_T + 1)  // padded row of a staged tile: lane r's column tt hits bank (r + tt) % 32

// One element of a map, or zero where `ok` is false (a predicated load: no branch, nothing read).
template <typename T>
__device__ __forceinline__ float m2d_load_or_zero(const T* p, bool ok) {
    T v;
    reinterpret_cast<unsigned short&>(v) = ok ? *reinterpret_cast<const unsigned short*>(p) : (unsigned short)0;
    return m2d_to_f(v);
}
template <>
__device__ __forceinline__ float m2d_load_or_zero<float>(const float* p, bool ok) {
    return ok ? *p : 0.f;
}

// The band-top buffer of the band starting at scan-frame row p0 > 0 (the vertical states of row p0 - 1): one per
// band when the forward keeps them for the backward (`per_band`), else one row reused by every band.
__device__ __forceinline__ m2d_i64 m2d_top_offset(int p0, int N, int W, bool per_band) {
    return per_band ? (m2d_i64)((p0 >> 5) - 1) * N * W : 0;
}

// A wavefront block: its map of the (batch, channel) grid, the map's group and direction, the thread's lane and warp.
struct M2DWave {
    int tid, nthr, lane, warp, nwarps, b, d, g;
    m2d_i64 map;
    bool fr, fc, vh;
};
__device__ __forceinline__ M2DWave m2d_wave_block(const M2DScanParams& prm, int dim, int G) {
    M2DWave w;
    w.tid = threadIdx.x;
    w.nthr = blockDim.x;
    w.lane = w.tid & 31;
    w.warp = w.tid >> 5;
    w.nwarps = w.nthr >> 5;
    w.map = blockIdx.x;
    w.b = (int)(w.map / dim);
    w.d = (int)(w.map - (m2d_i64)w.b * dim);
    w.g = w.d / (dim / G);
    const int code = m2d_direction(prm, w.g);
    w.fr = code & 1;
    w.fc = (code >> 1) & 1;
    w.vh = (code >> 2) & 1;
    return w;
}

// A wavefront block's inputs: its map's u, delta, z, its group's B and C (base pointers; in-map offsets are 32-bit),
// and the channel's D and delta_bias.
template <typename T>
struct M2DWaveInputs {
    const T *u, *delta, *z, *B, *C;
    float D, bias;
};
template <typename T>
__device__ __forceinline__ M2DWaveInputs<T> m2d_wave_inputs(const M2DWave& w, const T* u, const T* delta, const T* z,
                                                           const T* Bm, const T* Cm, const float* Dv,
                                                           const float* dbias, m2d_i64 su_b, m2d_i64 su_d,
                                                           m2d_i64 u_off, m2d_i64 sd_b, m2d_i64 sd_d, m2d_i64 sz_b,
                                                           m2d_i64 sz_d, m2d_i64 sB_b, m2d_i64 sB_g, m2d_i64 sC_b,
                                                           m2d_i64 sC_g) {
    M2DWaveInputs<T> in;
    in.u = m2d_base(u + (w.b * su_b + w.d * su_d + u_off));
    in.delta = m2d_base(delta + (w.b * sd_b + w.d * sd_d));
    in.z = z != nullptr ? m2d_base(z + (w.b * sz_b + w.d * sz_d)) : nullptr;
    in.B = m2d_base(Bm + (w.b * sB_b + w.g * sB_g));
    in.C = m2d_base(Cm + (w.b * sC_b + w.g * sC_g));
    in.D = Dv != nullptr ? Dv[w.d] : 0.f;
    in.bias = dbias != nullptr ? dbias[w.d] : 0.f;
    return in;
}

// One step of a lane's two recurrences in the direction's pass order: the row state hz and the vertical state vtl
// from the vertical state above (`up`: lane r - 1's of the step before, or the band top for lane 0) and the pixel's
// input x. Returns the output state.
__device__ __forceinline__ float m2d_wave_step(bool vh, float a, float up, float x, float& hz, float& vtl) {
    if (vh) {
        vtl = fmaf(a, up, x);
        hz = fmaf(a, hz, vtl);
        return hz;
    }
    hz = fmaf(a, hz, x);
    vtl = fmaf(a, up, hz);
    return vtl;
}

template <typename T, typename TO, int NS, bool HAS_Z>
__global__ void __launch_bounds__(M2D_MAX_THREADS, 2)
    mamba2d_scan2d_fwd_wave(const M2DScanParams prm) {
    const T* __restrict__ u = static_cast<const T*>(prm.u);
    const T* __restrict__ delta = static_cast<const T*>(prm.delta);
    const T* __restrict__ z = static_cast<const T*>(prm.z);
    const T* __restrict__ Bm = static_cast<const T*>(prm.Bm);
    const T* __restrict__ Cm = static_cast<const T*>(prm.Cm);
    const float* __restrict__ A = prm.A;
    const float* __restrict__ Dv = prm.Dv;
    const float* __restrict__ dbias = prm.dbias;
    TO* __restrict__ y = static_cast<TO*>(prm.y);
    float* __restrict__ tops = prm.tops;
    const int dim = prm.dim, H = prm.H, W = prm.W, G = prm.G, N = prm.N, softplus = prm.softplus;
    const m2d_i64 su_b = prm.su_b, su_d = prm.su_d;
    const int su_h = prm.su_h, su_w = prm.su_w;
    const m2d_i64 sd_b = prm.sd_b, sd_d = prm.sd_d;
    const int sd_h = prm.sd_h, sd_w = prm.sd_w;
    const m2d_i64 sz_b = prm.sz_b, sz_d = prm.sz_d;
    const int sz_h = prm.sz_h, sz_w = prm.sz_w;
    const m2d_i64 sB_b = prm.sB_b, sB_g = prm.sB_g;
    const int sB_n = prm.sB_n, sB_h = prm.sB_h, sB_w = prm.sB_w;
    const m2d_i64 sC_b = prm.sC_b, sC_g = prm.sC_g;
    const int sC_n = prm.sC_n, sC_h = prm.sC_h, sC_w = prm.sC_w;
    const int keep_tops = prm.keep_tops;
    constexpr int TQ = M2D_WAVE_T, TP = M2D_WAVE_TP, TILE = 32 * TP;
    static_assert(32 % TQ == 0, "M2D_WAVE_T must divide 32");
    extern __shared__ float m2d_smem[];
    const M2DWave wb = m2d_wave_block(prm, dim, G);
    const int tid = wb.tid, nthr = wb.nthr, lane = wb.lane, warp = wb.warp, nwarps = wb.nwarps, d = wb.d;
    const m2d_i64 map = wb.map;
    const bool fr = wb.fr, fc = wb.fc, vh = wb.vh;
    // Shared memory (cuda_build.WaveConfig.smem). State tiles have one more state, N: zeros (B, C and the band top)
    // for the states past N of the last warp, which then add nothing to y and need no test in the scan.
    float* sdt = m2d_smem;              // [32][TP] dt of the chunk's skewed window
    float* sdtu = sdt + TILE;           // [32][TP] dt * u
    float* sy0 = sdtu + TILE;           // [32][TP] D * u
    float* sB = sy0 + TILE;             // [N + 1][32][TP]
    float* sC = sB + (N + 1) * TILE;    // [N + 1][32][TP]
    float* svt = sC + (N + 1) * TILE;   // [N + 1][32][TP] the vertical pass's state at each pixel
    float* sy = svt + (N + 1) * TILE;   // [nwarps][32][TP] each warp's partial y
    float* sup = sy + nwarps * TILE;    // [N + 1][TP] the state above the band at lane 0's column of each step
    for (int e = tid; e < TILE; e += nthr) sB[N * TILE + e] = sC[N * TILE + e] = 0.f;
    for (int e = tid; e < TP; e += nthr) sup[N * TP + e] = 0.f;  // (a NaN left there would reach y through 0 * NaN)

    const M2DWaveInputs<T> in = m2d_wave_inputs(wb, u, delta, HAS_Z ? z : nullptr, Bm, Cm, Dv, dbias, su_b, su_d,
                                                m2d_u_offset(prm, wb.g), sd_b, sd_d, sz_b, sz_d, sB_b, sB_g, sC_b,
                                                sC_g);
    const float Dd = in.D, bias = in.bias;
    const T *ubp = in.u, *dbp_ = in.delta, *Bbp = in.B, *Cbp = in.C, *zbp = in.z;
    TO* ybp = y != nullptr ? m2d_base(y + map * ((m2d_i64)H * W)) : nullptr;
    // [bands - 1 or 1][N][W]: the last row of each band (the vertical states entering the band below)
    float* topp = m2d_base(tops + map * (keep_tops ? (H - 1) / 32 : 1) * N * W);
    const bool cload = y != nullptr;
    int sn[NS];  // the warp's states (N: past the last state)
    float An2[NS];
#pragma unroll
    for (int k = 0; k < NS; ++k) {
        sn[k] = min(warp * NS + k, N);
        An2[k] = sn[k] < N ? A[(m2d_i64)d * N + sn[k]] * M2D_LOG2E : 0.f;
    }

    // A chunk's inputs are loaded into registers one chunk ahead (their latency hides behind the scan of the chunk
    // before) and stored into shared memory when that chunk is done. Lane l's element m of a tile is row
    // r = l / TQ + m * RSTEP, step tt = l % TQ: the pixel (p0 + r, t0 + tt - r). Each warp stages B and C of its own
    // states, and the elements m of u and delta with m % nwarps == warp (bit m of `own`). From element m to m + 1
    // the pixel moves RSTEP rows down and RSTEP columns left in the scan frame: a fixed step of each offset.
    constexpr int RSTEP = 32 / TQ;
    const int lr = lane / TQ, ltt = lane % TQ;
    unsigned own = 0;
#pragma unroll
    for (int m = 0; m < TQ; ++m) own |= (m % nwarps == warp) ? 1u << m : 0u;
    const int di = fr ? -RSTEP : RSTEP, dj = fc ? RSTEP : -RSTEP;
    const int su_m = di * su_h + dj * su_w, sd_m = di * sd_h + dj * sd_w;
    const int sB_m = di * sB_h + dj * sB_w, sC_m = di * sC_h + dj * sC_w;
    float lu[TQ] = {}, ld[TQ] = {}, lb[NS][TQ], lc[NS][TQ], lt = 0.f;
    auto load_tops = [&](int p0, int t0) {  // lane l: the warp's state l / TQ, step l % TQ
        const int k = lane / TQ, n = warp * NS + k, q = t0 + ltt;
        lt = (p0 > 0 && k < NS && n < N && q < W) ? topp[m2d_top_offset(p0, N, W, keep_tops) + n * W + q] : 0.f;
    };
    auto load_chunk = [&](int p0, int t0, bool with_tops) {
        const int p = p0 + lr, q = t0 + ltt - lr;  // element 0
        const int i = fr ? H - 1 - p : p, j = fc ? W - 1 - q : q;
        int ou = i * su_h + j * su_w, od = i * sd_h + j * sd_w, ob = i * sB_h + j * sB_w, oc = i * sC_h + j * sC_w;
#pragma unroll
        for (int m = 0; m < TQ; ++m) {
            const int pm = p + m * RSTEP, qm = q - m * RSTEP;
            const bool ok = pm < H && qm >= 0 && qm < W;
#pragma unroll
            for (int k = 0; k < NS; ++k) {
                const bool okk = ok && sn[k] < N;
                lb[k][m] = m2d_load_or_zero(Bbp + (sn[k] * sB_n + ob), okk);
                lc[k][m] = m2d_load_or_zero(Cbp + (sn[k] * sC_n + oc), okk && cload);
            }
            if ((own >> m) & 1u) {  // the same for the whole warp
                lu[m] = m2d_load_or_zero(ubp + ou, ok);
                ld[m] = m2d_load_or_zero(dbp_ + od, ok);
            }
            ou += su_m;
            od += sd_m;
            ob += sB_m;
            oc += sC_m;
        }
        if (with_tops) load_tops(p0, t0);
    };
    auto store_chunk = [&](int p0, int t0) {
#pragma unroll
        for (int m = 0; m < TQ; ++m) {
            const int at = (lr + m * RSTEP) * TP + ltt;
#pragma unroll
            for (int k = 0; k < NS; ++k) {  // (zeros into the zero state for the states past N)
                sB[sn[k] * TILE + at] = lb[k][m];
                sC[sn[k] * TILE + at] = lc[k][m];
            }
            if ((own >> m) & 1u) {
                const int pm = p0 + lr + m * RSTEP, qm = t0 + ltt - lr - m * RSTEP;
                const bool ok = pm < H && qm >= 0 && qm < W;
                const float v = ld[m] + bias;
                const float dt = m2d_select(ok, softplus ? m2d_softplus(v) : v, 0.f);
                sdt[at] = dt;
                sdtu[at] = __fmul_rn(dt, lu[m]);
                sy0[at] = Dd * lu[m];
            }
        }
        const int k = lane / TQ;
        if (k < NS && warp * NS + k < N) sup[(warp * NS + k) * TP + ltt] = lt;
    };

    float hz[NS], vtl[NS];  // the lane's row state, and its vertical state of the step before
    int p0 = 0, t0 = 0;
    bool tops_late = false;  // the chunk's band-top states were not safe to load ahead: load them now
    load_chunk(0, 0, true);
    while (p0 < H) {
        const int nsteps = W + min(32, H - p0) - 1;
        if (t0 == 0) {
#pragma unroll
            for (int k = 0; k < NS; ++k) hz[k] = vtl[k] = 0.f;
        }
        if (tops_late) {  // the last chunk's writes of the band's top row are complete past this barrier
            __syncthreads();
            load_tops(p0, t0);
        }
        store_chunk(p0, t0);
        __syncthreads();
        // The next chunk's loads. Its band-top states are this band's last row when it starts the next band; that
        // row's column q is written out after the chunk holding step q + 31, so the first TQ columns are complete
        // only once the chunks before this one are (otherwise they are read after this chunk).
        int p1 = p0, t1 = t0 + TQ;
        if (t1 >= nsteps) {
            p1 = p0 + 32;
            t1 = 0;
        }
        const bool tops_early = p1 == p0 || TQ + 30 < t0;
        if (p1 < H) load_chunk(p1, t1, tops_early);

#pragma unroll
        for (int tt = 0; tt < TQ; ++tt) {
            const float dt = sdt[lane * TP + tt], dtu = sdtu[lane * TP + tt];
            float ys = warp == 0 ? sy0[lane * TP + tt] : 0.f;
#pragma unroll
            for (int k = 0; k < NS; ++k) {
                const int at = sn[k] * TILE + lane * TP + tt;
                const float a = m2d_exp2(dt * An2[k]);
                const float x = __fmul_rn(dtu, sB[at]);
                float up = __shfl_up_sync(M2D_FULL, vtl[k], 1);
                if (lane == 0) up = sup[sn[k] * TP + tt];
                ys = fmaf(sC[at], m2d_wave_step(vh, a, up, x, hz[k], vtl[k]), ys);
                svt[at] = vtl[k];
            }
            sy[(warp * 32 + lane) * TP + tt] = ys;
        }
        __syncthreads();
        // y (the warps' partial sums in a fixed order, then the gate) and the band's last row for the next band:
        // coalesced along rows.
        if (ybp != nullptr) {
            for (int e = tid; e < 32 * TQ; e += nthr) {
                const int r = e / TQ, tt = e - r * TQ, pp = p0 + r, q = t0 + tt - r;
                if (pp < H && q >= 0 && q < W) {
                    const int i = fr ? H - 1 - pp : pp, j = fc ? W - 1 - q : q;
                    float acc = 0.f;
                    for (int w = 0; w < nwarps; ++w) acc += sy[(w * 32 + r) * TP + tt];
                    if (HAS_Z) {
                        const float zz = m2d_to_f(zbp[i * sz_h + j * sz_w]);
                        acc *= zz * m2d_sigmoid(zz);
                    }
                    ybp[i * W + j] = m2d_from_f<TO>(acc);
                }
            }
        }
        if (p0 + 32 < H) {
            float* next_top = topp + m2d_top_offset(p0 + 32, N, W, keep_tops);
            for (int e = tid; e < N * TQ; e += nthr) {
                const int n = e / TQ, tt = e - n * TQ, q = t0 + tt - 31;
                if (q >= 0 && q < W) next_top[n * W + q] = svt[(n * 32 + 31) * TP + tt];
            }
        }
        tops_late = p1 < H && !tops_early;
        p0 = p1;
        t0 = t1;
    }
}

// A float copied from global to shared memory without passing through registers (cp.async, sm_80+): `bytes` 4, or 0
// for a zero (nothing read); the copies of a thread land by m2d_copy_async_wait.
__device__ __forceinline__ void m2d_copy_async(float* dst, const float* src, unsigned bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"((unsigned)__cvta_generic_to_shared(dst)),
                 "l"(src), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void m2d_copy_async_wait() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Thread-block clusters (sm_90+): the wavefront backward adds the dB/dC tiles of a cluster's channels (blocks of
// consecutive channels of one group) in shared memory across the cluster before they leave the SMs. A launch on an
// older card takes clusters of one block (the launcher never asks for more there), which need no attribute.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define M2D_CLUSTER_DIMS(n)
#else
#define M2D_CLUSTER_DIMS(n) __cluster_dims__(n, 1, 1)
#endif
__device__ __forceinline__ unsigned m2d_cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
// Split cluster barrier: arrive (releasing this thread's shared-memory writes and reads) ... wait (acquiring every
// other thread's of the cluster).
__device__ __forceinline__ void m2d_cluster_arrive() {
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void m2d_cluster_wait() {
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// The address of this block's shared `p` in the cluster's block `rank` (a generic pointer: plain loads read it).
__device__ __forceinline__ const float* m2d_cluster_map(const float* p, unsigned rank) {
    unsigned long long r;
    asm volatile("mapa.u64 %0, %1, %2;" : "=l"(r) : "l"(p), "r"(rank));
    return reinterpret_cast<const float*>(r);
}

// Wavefront backward, for the maps the wavefront forward takes (same block, warp and lane roles). Bands run bottom
// to top, each in two passes over its steps:
//  1. forward, chunk by chunk from the band's top row (kept by the forward in `tops`), saving each lane's row state
//     and vertical state at every chunk end in a per-map scratch (`ck`: a few hundred KB per map, L2-resident);
//  2. backward, chunk by chunk from the last: the chunk's forward states are recomputed from the checkpoint of the
//     chunk before, keeping per step and state the vertical state above the lane's pixel (`upv`) and the row state
//     left of it (`hzl`) in registers, which is all the adjoint needs: in both pass orders the output state is
//     h = Abar * (up + left) + x and d(Abar) * Abar = Abar * (dcol * up + drow * left), dcol and drow the adjoints
//     of the vertical and the row pass. The steps then run in reverse: at step t lane r still holds pixel
//     (p0 + r, t - r); the row adjoint comes from the lane's own step t + 1 and the column adjoint from lane r + 1's
//     (one shuffle per pixel and state; lane 31 takes the band below's top row, kept in `bot`).
// Per pixel, the states' shares of d u and d delta (and of the ungated y, for d z) are summed over the warps in
// shared memory in a fixed order; dB and dC go out tile by tile, contiguous: with clusters of CL > 1 blocks (CL
// consecutive channels of one group) each block adds its share of the tile over the cluster's channels in rank
// order first, so one tile per cluster leaves the SMs instead of CL (the launcher adds the clusters' tiles in a fixed
// order and puts the tiles' pixels in place); dA, dD and d(delta_bias) are reduced in the block in a fixed order.
template <typename T, typename TO, int NS, bool HAS_Z, int CL>
__global__ void M2D_CLUSTER_DIMS(CL) __launch_bounds__(M2D_MAX_THREADS, 2)
    mamba2d_scan2d_bwd_wave(const M2DScanParams prm) {
    const T* __restrict__ u = static_cast<const T*>(prm.u);
    const T* __restrict__ delta = static_cast<const T*>(prm.delta);
    const T* __restrict__ z = static_cast<const T*>(prm.z);
    const TO* __restrict__ dout = static_cast<const TO*>(prm.dout);
    const T* __restrict__ Bm = static_cast<const T*>(prm.Bm);
    const T* __restrict__ Cm = static_cast<const T*>(prm.Cm);
    const float* __restrict__ A = prm.A;
    const float* __restrict__ Dv = prm.Dv;
    const float* __restrict__ dbias = prm.dbias;
    const float* __restrict__ tops = prm.tops;
    float* __restrict__ ck = prm.ck;
    float* __restrict__ bot = prm.bot;
    T* __restrict__ du = static_cast<T*>(prm.du);
    T* __restrict__ ddelta = static_cast<T*>(prm.ddelta);
    T* __restrict__ dz = static_cast<T*>(prm.dz);
    float* __restrict__ dBp = prm.dBp;
    float* __restrict__ dCp = prm.dCp;
    float* __restrict__ dAp = prm.dAp;
    float* __restrict__ dDp = prm.dDp;
    float* __restrict__ dbp = prm.dbp;
    const int dim = prm.dim, H = prm.H, W = prm.W, G = prm.G, N = prm.N, softplus = prm.softplus;
    const m2d_i64 su_b = prm.su_b, su_d = prm.su_d;
    const int su_h = prm.su_h, su_w = prm.su_w;
    const m2d_i64 sd_b = prm.sd_b, sd_d = prm.sd_d;
    const int sd_h = prm.sd_h, sd_w = prm.sd_w;
    const m2d_i64 sz_b = prm.sz_b, sz_d = prm.sz_d;
    const int sz_h = prm.sz_h, sz_w = prm.sz_w;
    const m2d_i64 so_b = prm.so_b, so_d = prm.so_d;
    const int so_h = prm.so_h, so_w = prm.so_w;
    const m2d_i64 sB_b = prm.sB_b, sB_g = prm.sB_g;
    const int sB_n = prm.sB_n, sB_h = prm.sB_h, sB_w = prm.sB_w;
    const m2d_i64 sC_b = prm.sC_b, sC_g = prm.sC_g;
    const int sC_n = prm.sC_n, sC_h = prm.sC_h, sC_w = prm.sC_w;
    const int ck_chunks = prm.ck_chunks;
    constexpr int TQ = M2D_WAVE_T, TP = M2D_WAVE_TP, TILE = 32 * TP;
    extern __shared__ float m2d_smem[];
    const M2DWave wb = m2d_wave_block(prm, dim, G);
    const int tid = wb.tid, nthr = wb.nthr, lane = wb.lane, warp = wb.warp, nwarps = wb.nwarps, d = wb.d;
    const m2d_i64 map = wb.map;
    const bool fr = wb.fr, fc = wb.fc, vh = wb.vh;
    // Shared memory (cuda_build.WaveConfig.smem_bwd); state tiles have a zero state N as in the forward. The
    // backward pass overwrites each B and C it has read with that pixel's dB and dC of the channel.
    float* sdt = m2d_smem;                 // [32][TP] dt of the chunk's skewed window
    float* sdtu = sdt + TILE;              // [32][TP] dt * u
    float* su = sdtu + TILE;               // [32][TP] u
    float* sdy = su + TILE;                // [32][TP] d y (through the gate: dout * silu(z))
    float* ssg = sdy + TILE;               // [32][TP] d dt / d delta
    float* sB = ssg + TILE;                // [N + 1][32][TP] B, then dB
    float* sC = sB + (N + 1) * TILE;       // [N + 1][32][TP] C, then dC
    float* sdu = sC + (N + 1) * TILE;      // [nwarps][32][TP] each warp's share of d u
    float* sddt = sdu + nwarps * TILE;     // [nwarps][32][TP] ... of d dt
    float* sup = sddt + nwarps * TILE;     // [N + 1][TP] the state above the band at lane 0's column of each step
    float* sbot = sup + (N + 1) * TP;      // [N + 1][TP] the column adjoint below the band at lane 31's column
    float* sbotw = sbot + (N + 1) * TP;    // [N + 1][TP] the column adjoint leaving the band's top row
    float* syp = sbotw + (N + 1) * TP;     // with z: [nwarps][32][TP] each warp's share of the ungated y
    float* sdz = syp + nwarps * TILE;      // with z: [32][TP] d z / (ungated y)
    for (int e = tid; e < TILE; e += nthr) sB[N * TILE + e] = sC[N * TILE + e] = 0.f;
    for (int e = tid; e < TP; e += nthr) sup[N * TP + e] = sbot[N * TP + e] = 0.f;

    const M2DWaveInputs<T> in = m2d_wave_inputs(wb, u, delta, HAS_Z ? z : nullptr, Bm, Cm, Dv, dbias, su_b, su_d,
                                                m2d_u_offset(prm, wb.g), sd_b, sd_d, sz_b, sz_d, sB_b, sB_g, sC_b,
                                                sC_g);
    const float Dd = in.D, bias = in.bias;
    const T *ubp = in.u, *dbp_ = in.delta, *Bbp = in.B, *Cbp = in.C, *zbp = in.z;
    const TO* obp = m2d_base(dout + (wb.b * so_b + d * so_d + m2d_dout_offset(prm, wb.g)));
    const int HW = H * W;  // N * H * W fits an int (the launcher checks)
    T* dup = m2d_base(du + map * HW);
    T* ddp = m2d_base(ddelta + map * HW);
    T* dzp = HAS_Z ? m2d_base(dz + map * HW) : nullptr;
    // The cluster's (with CL = 1 the channel's) dB and dC in tile order: [band][chunk][N][32][TQ] (rows of the
    // band, steps of the chunk)
    const m2d_i64 tile_chunk = (m2d_i64)N * 32 * TQ;
    float* dBpp = m2d_base(dBp + map / CL * ((H + 31) / 32) * ck_chunks * tile_chunk);
    float* dCpp = m2d_base(dCp + map / CL * ((H + 31) / 32) * ck_chunks * tile_chunk);
    const float* topp = m2d_base(tops + map * ((H - 1) / 32) * N * W);
    float* botp = m2d_base(bot + map * N * W);
    float* ckp = m2d_base(ck + map * ck_chunks * N * 64);  // [chunk][N][2][32]: row and vertical state per lane
    int sn[NS];
    float An[NS], An2[NS];
#pragma unroll
    for (int k = 0; k < NS; ++k) {
        sn[k] = min(warp * NS + k, N);
        An[k] = sn[k] < N ? A[(m2d_i64)d * N + sn[k]] : 0.f;
        An2[k] = An[k] * M2D_LOG2E;
    }

    // The skewed window's pixel of element e of a staged tile: row r = e / TQ, step tt = e % TQ.
    struct Px {
        int at, i, j;
        bool ok;
    };
    auto pixel = [&](int e, int p0, int t0) {
        Px x;
        const int r = e / TQ, tt = e - r * TQ, p = p0 + r, q = t0 + tt - r;
        x.ok = p < H && q >= 0 && q < W;
        x.i = fr ? H - 1 - p : p;
        x.j = fc ? W - 1 - q : q;
        x.at = r * TP + tt;
        return x;
    };
    // Stage the chunk at (p0, t0) (`full`: everything pass 2 reads, else what the forward recurrence reads). A
    // thread stages whole pixels of the tile, every state's B and C of its pixel from one address per array (a
    // fixed step per state): float32 B and C as asynchronous copies (no register, no wait per element), 16-bit ones
    // through registers, SB states' loads issued before their stores.
    constexpr int SB = 8;
    auto stage = [&](int p0, int t0, bool full) {
        for (int e = tid; e < 32 * TQ; e += nthr) {
            const Px x = pixel(e, p0, t0);
            const float uu = m2d_load_or_zero(ubp + (x.i * su_h + x.j * su_w), x.ok);
            const float v = m2d_load_or_zero(dbp_ + (x.i * sd_h + x.j * sd_w), x.ok) + bias;
            const float go = m2d_load_or_zero(obp + (x.i * so_h + x.j * so_w), x.ok && full);
            const float zz = HAS_Z ? m2d_load_or_zero(zbp + (x.i * sz_h + x.j * sz_w), x.ok && full) : 0.f;
            int ob = x.i * sB_h + x.j * sB_w, oc = x.i * sC_h + x.j * sC_w;
            if constexpr (sizeof(T) == 4) {  // straight into shared memory, zero-filled outside the map
                const unsigned bytes = x.ok ? 4u : 0u;
                ob = x.ok ? ob : 0;
                oc = x.ok ? oc : 0;
                for (int n = 0; n < N; ++n) {
                    m2d_copy_async(&sB[n * TILE + x.at], Bbp + ob, bytes);
                    if (full) m2d_copy_async(&sC[n * TILE + x.at], Cbp + oc, bytes);
                    ob += x.ok ? sB_n : 0;
                    oc += x.ok ? sC_n : 0;
                }
            } else {
                for (int n0 = 0; n0 < N; n0 += SB) {
                    float vb[SB], vc[SB];
#pragma unroll
                    for (int k = 0; k < SB; ++k) {
                        const bool ok = x.ok && n0 + k < N;
                        vb[k] = m2d_load_or_zero(Bbp + ob, ok);
                        vc[k] = m2d_load_or_zero(Cbp + oc, ok && full);
                        ob += sB_n;
                        oc += sC_n;
                    }
#pragma unroll
                    for (int k = 0; k < SB; ++k) {
                        if (n0 + k < N) {
                            sB[(n0 + k) * TILE + x.at] = vb[k];
                            if (full) sC[(n0 + k) * TILE + x.at] = vc[k];
                        }
                    }
                }
            }
            float sg = 1.f;
            const float dt = m2d_select(x.ok, softplus ? m2d_softplus_with_grad(v, sg) : v, 0.f);
            sdt[x.at] = dt;
            sdtu[x.at] = __fmul_rn(dt, uu);
            if (full) {
                su[x.at] = uu;
                ssg[x.at] = sg;
                if (HAS_Z) {
                    const float s = m2d_sigmoid(zz);
                    sdy[x.at] = go * zz * s;
                    sdz[x.at] = go * s * (1.f + zz * (1.f - s));
                } else {
                    sdy[x.at] = go;
                }
            }
        }
        for (int e = tid; e < N * TQ; e += nthr) {
            const int n = e / TQ, tt = e - n * TQ, q = t0 + tt, qb = q - 31;
            sup[n * TP + tt] = (p0 > 0 && q < W) ? topp[m2d_top_offset(p0, N, W, true) + n * W + q] : 0.f;
            if (full) sbot[n * TP + tt] = (p0 + 32 < H && qb >= 0 && qb < W) ? botp[n * W + qb] : 0.f;
        }
        if constexpr (sizeof(T) == 4) m2d_copy_async_wait();
    };

    // The forward recurrence over the staged chunk from the states entering it (hz, vtl), recording per step and
    // state the vertical state above the lane's pixel (upv) and the row state left of it (hzl).
    auto forward_chunk = [&](float(&hz)[NS], float(&vtl)[NS], float(&upv)[NS][TQ], float(&hzl)[NS][TQ]) {
#pragma unroll
        for (int tt = 0; tt < TQ; ++tt) {
            const float dt = sdt[lane * TP + tt], dtu = sdtu[lane * TP + tt];
#pragma unroll
            for (int k = 0; k < NS; ++k) {
                const int at = sn[k] * TILE + lane * TP + tt;
                const float a = m2d_exp2(dt * An2[k]);
                const float x = __fmul_rn(dtu, sB[at]);
                float up = __shfl_up_sync(M2D_FULL, vtl[k], 1);
                if (lane == 0) up = sup[sn[k] * TP + tt];
                upv[k][tt] = up;
                hzl[k][tt] = hz[k];
                m2d_wave_step(vh, a, up, x, hz[k], vtl[k]);
            }
        }
    };

    double dA_acc[NS], dD_acc = 0.0, db_acc = 0.0;  // the thread's sums (float within a chunk, double across)
#pragma unroll
    for (int k = 0; k < NS; ++k) dA_acc[k] = 0.0;

    const int nbands = (H + 31) / 32;
    for (int band = nbands - 1; band >= 0; --band) {
        const int p0 = band * 32;
        const int nchunks = (W + min(32, H - p0) - 1 + TQ - 1) / TQ;
        float hz[NS], vtl[NS];
        // Pass 1: the forward recurrence over every chunk but the last, saving the state at each chunk end.
#pragma unroll
        for (int k = 0; k < NS; ++k) hz[k] = vtl[k] = 0.f;
        for (int c = 0; c + 1 < nchunks; ++c) {
            const int t0 = c * TQ;
            stage(p0, t0, false);
            __syncthreads();
            float upv[NS][TQ], hzl[NS][TQ];  // (not used: dropped by the compiler)
            forward_chunk(hz, vtl, upv, hzl);
#pragma unroll
            for (int k = 0; k < NS; ++k) {
                if (sn[k] < N) {
                    float* at = ckp + ((m2d_i64)(c * N + sn[k]) * 2) * 32 + lane;
                    at[0] = hz[k];
                    at[32] = vtl[k];
                }
            }
            __syncthreads();  // the staged tiles are overwritten next
        }
        // Pass 2: chunks from the last, each recomputed forward then run backward.
        float th[NS], tvo[NS];  // the row adjoint times Abar leaving the lane's last step; the column one likewise
#pragma unroll
        for (int k = 0; k < NS; ++k) th[k] = tvo[k] = 0.f;
        for (int c = nchunks - 1; c >= 0; --c) {
            const int t0 = c * TQ;
#pragma unroll
            for (int k = 0; k < NS; ++k) {  // the states entering the chunk (in flight while it is staged)
                const bool ok = c > 0 && sn[k] < N;
                const float* at = ckp + ((m2d_i64)((max(c, 1) - 1) * N + min(sn[k], N - 1)) * 2) * 32 + lane;
                hz[k] = ok ? at[0] : 0.f;
                vtl[k] = ok ? at[32] : 0.f;
            }
            stage(p0, t0, true);
            __syncthreads();
            float upv[NS][TQ], hzl[NS][TQ];
            forward_chunk(hz, vtl, upv, hzl);
            float dAl[NS];
#pragma unroll
            for (int k = 0; k < NS; ++k) dAl[k] = 0.f;
#pragma unroll
            for (int tt = TQ - 1; tt >= 0; --tt) {
                const int pix = lane * TP + tt;
                const float dt = sdt[pix], dtu = sdtu[pix], uu = su[pix], dy = sdy[pix];
                float dus = 0.f, dds = 0.f, yps = 0.f;
#pragma unroll
                for (int k = 0; k < NS; ++k) {
                    const int at = sn[k] * TILE + pix;
                    const float a = m2d_exp2(dt * An2[k]);
                    const float bb = sB[at], cc = sC[at];
                    const float h = fmaf(a, upv[k][tt] + hzl[k][tt], __fmul_rn(dtu, bb));
                    float tin = __shfl_down_sync(M2D_FULL, tvo[k], 1);
                    if (lane == 31) tin = sbot[sn[k] * TP + tt];
                    float dcol, drow, dx;
                    if (vh) {
                        drow = fmaf(cc, dy, th[k]);
                        dcol = drow + tin;
                        dx = dcol;
                    } else {
                        dcol = fmaf(cc, dy, tin);
                        drow = dcol + th[k];
                        dx = drow;
                    }
                    th[k] = a * drow;
                    tvo[k] = a * dcol;
                    const float daa = a * fmaf(dcol, upv[k][tt], drow * hzl[k][tt]);
                    const float gb = dx * bb;
                    dus = fmaf(gb, dt, dus);
                    dds = fmaf(daa, An[k], fmaf(gb, uu, dds));
                    dAl[k] = fmaf(daa, dt, dAl[k]);
                    sB[at] = dx * dtu;
                    sC[at] = dy * h;
                    if (HAS_Z) yps = fmaf(cc, h, yps);
                    if (lane == 0) sbotw[sn[k] * TP + tt] = tvo[k];
                }
                sdu[(warp * 32 + lane) * TP + tt] = dus;
                sddt[(warp * 32 + lane) * TP + tt] = dds;
                if (HAS_Z) syp[(warp * 32 + lane) * TP + tt] = yps;
            }
#pragma unroll
            for (int k = 0; k < NS; ++k) dA_acc[k] += (double)dAl[k];
            __syncthreads();
            // The chunk's gradients: dB and dC of every state as the tiles they are (contiguous writes; the
            // launcher's sum over clusters puts them in place; pixels outside the map hold zeros there and are
            // never read), then d u, d delta, d z coalesced along rows (the warps' shares summed in a fixed order).
            float dD_chunk = 0.f, db_chunk = 0.f;
            float* tB = dBpp + (band * ck_chunks + c) * tile_chunk;
            float* tC = dCpp + (band * ck_chunks + c) * tile_chunk;
            if constexpr (CL > 1) {
                // Every block of the cluster has its channel's tiles; this one adds pixels [rank * P, (rank + 1) *
                // P) of them, every state, over the cluster's blocks in rank order.
                constexpr unsigned P = 32 * TQ / CL;
                m2d_cluster_arrive();
                m2d_cluster_wait();
                const unsigned pe0 = m2d_cluster_rank() * P;
                const float* rB[CL];
#pragma unroll
                for (int j = 0; j < CL; ++j) rB[j] = m2d_cluster_map(sB, j);
                const int c_off = (int)(sC - sB);
#pragma unroll 2
                for (unsigned e = tid; e < N * P; e += nthr) {
                    const unsigned n = e / P, pe = pe0 + e % P;
                    const int at = (int)(n * TILE + pe / TQ * TP + pe % TQ);
                    float sb = rB[0][at], sc = rB[0][c_off + at];
#pragma unroll
                    for (int j = 1; j < CL; ++j) {
                        sb += rB[j][at];
                        sc += rB[j][c_off + at];
                    }
                    tB[n * (32 * TQ) + pe] = sb;
                    tC[n * (32 * TQ) + pe] = sc;
                }
                m2d_cluster_arrive();  // this block's reads are done (waited for before the tiles are restaged)
            }
            for (int e = tid; e < 32 * TQ; e += nthr) {
                const Px x = pixel(e, p0, t0);
                const int at = x.at;
                if constexpr (CL == 1) {
#pragma unroll 4
                    for (int n = 0; n < N; ++n) {
                        tB[n * (32 * TQ) + e] = sB[n * TILE + at];
                        tC[n * (32 * TQ) + e] = sC[n * TILE + at];
                    }
                }
                if (!x.ok) continue;
                const int o = x.i * W + x.j;
                float dus = 0.f, dds = 0.f;
                for (int w = 0; w < nwarps; ++w) {
                    dus += sdu[w * TILE + at];
                    dds += sddt[w * TILE + at];
                }
                const float dy = sdy[at], uu = su[at], ddl = dds * ssg[at];
                dup[o] = m2d_from_f<T>(fmaf(Dd, dy, dus));
                ddp[o] = m2d_from_f<T>(ddl);
                dD_chunk = fmaf(dy, uu, dD_chunk);
                db_chunk += ddl;
                if (HAS_Z) {
                    float yp = Dd * uu;
                    for (int w = 0; w < nwarps; ++w) yp += syp[w * TILE + at];
                    dzp[o] = m2d_from_f<T>(yp * sdz[at]);
                }
            }
            dD_acc += (double)dD_chunk;
            db_acc += (double)db_chunk;
            if (p0 > 0) {  // the column adjoint entering the band above, at lane 31's columns there
                for (int e = tid; e < N * TQ; e += nthr) {
                    const int n = e / TQ, tt = e - n * TQ, q = t0 + tt;
                    if (q < W) botp[n * W + q] = sbotw[n * TP + tt];
                }
            }
            __syncthreads();  // the staged tiles are overwritten next
            if constexpr (CL > 1) m2d_cluster_wait();  // ... and the cluster's reads of them are done
        }
    }
    // dA per state (the lanes' sums in a fixed tree order), dD and d(delta_bias) per channel (the threads' in order).
#pragma unroll
    for (int k = 0; k < NS; ++k) {
        double v = dA_acc[k];
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(M2D_FULL, v, off);
        if (lane == 0 && sn[k] < N) dAp[map * N + sn[k]] = (float)v;
    }
    double* red = reinterpret_cast<double*>(m2d_smem);  // [2][nthr]
    red[tid] = dD_acc;
    red[nthr + tid] = db_acc;
    __syncthreads();
    if (tid == 0) {
        double s0 = 0.0, s1 = 0.0;
        for (int t = 0; t < nthr; ++t) {
            s0 += red[t];
            s1 += red[nthr + t];
        }
        dDp[map] = (float)s0;
        dbp[map] = (float)s1;
    }
}
