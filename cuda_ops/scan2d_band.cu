// 2D selective scan (contract: docs/scan.md): the per-band forward and backward kernels, for every map the
// wavefront kernels (scan2d_wave.cu) do not take. Each takes its parameters as one grid-constant
// M2DScanParams (scan2d_params.cuh): pointers unpacked at the top, scalars referenced in place.
//
// Work split: one block = CH channels ("slots") of one (batch, group); one thread = K consecutive columns of a slot's
// tile; each thread keeps a band of R rows x K columns in registers (template arguments R, K, and LAYOUT: how a
// slot's row maps onto lanes and warps). Per band: load u/delta once (clamped addresses, values outside the map
// masked to zero), then loop over the N states (B/C read once per state): horizontal pass = lane/warp scan along the
// row, vertical pass = sequential recurrence down the thread's column with the carry kept in shared memory per
// state. Directions are index arithmetic: scan-frame (p, q) -> memory (i, j) = (fr ? H-1-p : p, fc ? W-1-q : q);
// "vh" swaps the order of the two passes. When (batch, group, channel chunk) blocks are too few to fill the GPU, the
// launcher splits the N states into parts of NP (blockIdx.y): each part writes partial sums of y (forward) and of
// du, ddelta, dD, d(delta_bias) (backward) that the launcher adds in a fixed order; dA, dB, dC are per state anyway.
//
// Backward recomputes the forward states band by band from checkpoints (the vertical state at each band start and
// the horizontal state at each tile start: O(H*W*N/R) per map, never per pixel and state), walks bands bottom-up and
// tiles right-to-left, and reduces dB/dC over the channels of a block in shared memory in a fixed order into
// per-block partial sums (summed in fixed order by the launcher); dA/dD/d(delta_bias) are reduced per block the same
// way. No atomics anywhere: results are bitwise reproducible.
#include "scan2d_common.cuh"


// LAYOUT: M2D_NARROW, M2D_WARP_ROW or M2D_WIDE (scan2d_common.cuh). HAS_Z: the z gate is given (no code otherwise).
template <typename T, typename TO, int R, int K, int LAYOUT, bool HAS_Z, int MINB>
__global__ void __launch_bounds__(M2D_MAX_THREADS, MINB)
    mamba2d_scan2d_fwd(const __grid_constant__ M2DScanParams prm) {
    const T* __restrict__ u = static_cast<const T*>(prm.u);
    const T* __restrict__ delta = static_cast<const T*>(prm.delta);
    const T* __restrict__ z = static_cast<const T*>(prm.z);
    const T* __restrict__ Bm = static_cast<const T*>(prm.Bm);
    const T* __restrict__ Cm = static_cast<const T*>(prm.Cm);
    const float* __restrict__ A = prm.A;
    const float* __restrict__ Dv = prm.Dv;
    const float* __restrict__ dbias = prm.dbias;
    TO* __restrict__ y = static_cast<TO*>(prm.y);
    float* __restrict__ ckv = prm.ckv;
    float* __restrict__ ckh = prm.ckh;
    // The scalars are references into the grid-constant parameter block, read where they are used as separate
    // kernel parameters were: copied into registers at entry, they crowded out the scan's own values, and the
    // kernels spilled or recomputed their clamped indices (forward and backward up to a third slower).
    const int &dim = prm.dim, &H = prm.H, &W = prm.W, &G = prm.G, &N = prm.N, &softplus = prm.softplus;
    const m2d_i64 &su_b = prm.su_b, &su_d = prm.su_d;
    const int &su_h = prm.su_h, &su_w = prm.su_w;
    const m2d_i64 &sd_b = prm.sd_b, &sd_d = prm.sd_d;
    const int &sd_h = prm.sd_h, &sd_w = prm.sd_w;
    const m2d_i64 &sz_b = prm.sz_b, &sz_d = prm.sz_d;
    const int &sz_h = prm.sz_h, &sz_w = prm.sz_w;
    const m2d_i64 &sB_b = prm.sB_b, &sB_g = prm.sB_g;
    const int &sB_n = prm.sB_n, &sB_h = prm.sB_h, &sB_w = prm.sB_w;
    const m2d_i64 &sC_b = prm.sC_b, &sC_g = prm.sC_g;
    const int &sC_n = prm.sC_n, &sC_h = prm.sC_h, &sC_w = prm.sC_w;
    const int &S = prm.S, &WPM = prm.WPM, &CH = prm.CH, &ntiles = prm.ntiles, &nbands = prm.nbands, &NP = prm.NP;
    const m2d_i64 &nmaps = prm.nmaps;
    const int &vec = prm.vec;
    extern __shared__ float m2d_smem[];
    const M2DCtx c = m2d_make_ctx(dim, H, W, G, N, S, WPM, CH, K, ntiles, nbands);
    // States n0 .. n1 - 1 of the block's channels (blockIdx.y: the part of a state split; y is then part-major).
    const int n0 = blockIdx.y * NP, n1 = min(N, n0 + NP);
    float* carry = m2d_smem;                         // [NP][K][nthr] vertical state per thread, state and column
    float* aggM = carry + (m2d_i64)NP * K * c.nthr;  // [CH][WPM][R]
    float* aggV = aggM + CH * WPM * R;
    float* cinb = aggV + CH * WPM * R;

    const int d = c.g * c.dg + (c.slot_ok ? c.chunk * CH + c.slot : 0);
    const int code = m2d_direction(prm, c.g);
    const bool fr = code & 1, fc = (code >> 1) & 1, vh = (code >> 2) & 1;
    const m2d_i64 map = (m2d_i64)c.b * dim + d;
    const float Dd = (Dv != nullptr && c.slot_ok && blockIdx.y == 0) ? Dv[d] : 0.f;  // D u: in one part only
    const float bias = (dbias != nullptr && c.slot_ok) ? dbias[d] : 0.f;
    const T* ubp = m2d_base(u + (c.b * su_b + d * su_d + m2d_u_offset(prm, c.g)));
    const T* dbp_ = m2d_base(delta + (c.b * sd_b + d * sd_d));
    const T* zbp = HAS_Z ? m2d_base(z + (c.b * sz_b + d * sz_d)) : nullptr;
    const T* Bbp = m2d_base(Bm + (c.b * sB_b + c.g * sB_g + (m2d_i64)n0 * sB_n));  // at state n0
    const T* Cbp = m2d_base(Cm + (c.b * sC_b + c.g * sC_g + (m2d_i64)n0 * sC_n));
    TO* ybp = y != nullptr ? m2d_base(y + (blockIdx.y * nmaps + map) * ((m2d_i64)H * W)) : nullptr;
    float* ckvp = ckv != nullptr ? m2d_base(ckv + map * nbands * N * W) : nullptr;
    const bool cload = y != nullptr;  // without y (checkpoints only) C is not needed

    for (int tile = 0; tile < ntiles; ++tile) {
        const int q = tile * c.TWs + c.col * K;  // scan-frame column of the thread's first column
        const int nk = c.slot_ok ? min(K, W - q) : 0;  // valid columns of the thread (<= 0: none)
        const int j = fc ? (W - 1 - q) : q;
        const M2DCols<K> cols = m2d_columns<K>(q, W, fc, vec);
        for (int e = 0; e < (n1 - n0) * K; ++e) carry[e * c.nthr + c.tid] = 0.f;
        // With `ahead`, a band's u, delta and state n0's B and C are loaded a band ahead of their use (in flight
        // while the band before is scanned; `raw`: as loaded), else at the top of their own band.
        constexpr bool ahead = M2D_FWD_AHEAD && (sizeof(T) == 4 || K == 1) && LAYOUT == M2D_WARP_ROW && MINB >= 3;
        m2d_vec<T, K> raw[4][R];
        auto fetch = [&](const int(&rows)[R]) {
            m2d_fetch_band<R, K>(Bbp, sB_h, sB_w, rows, cols, raw[0]);
            m2d_fetch_band<R, K>(Cbp, sC_h, sC_w, rows, cols, raw[1]);
            m2d_fetch_band<R, K>(ubp, su_h, su_w, rows, cols, raw[2]);
            m2d_fetch_band<R, K>(dbp_, sd_h, sd_w, rows, cols, raw[3]);
        };
        int irow[R];
        if constexpr (ahead) {
            m2d_rows<R>(0, H, fr, irow);
            fetch(irow);
        }
        for (int band = 0; band < nbands; ++band) {
            const int p0 = band * R;
            const int nrow = nk > 0 ? min(R, H - p0) : 0;
            if constexpr (!ahead) m2d_rows<R>(p0, H, fr, irow);
            int irow_next[R];  // with `ahead`: the next band's rows, fetched now
            const unsigned valid = m2d_valid_mask<R, K>(nrow, nk);
            float dt[R][K], dtu[R][K], yacc[R][K], bq[R][K], cq[R][K], uu[R][K], dl[R][K];
            if constexpr (ahead) {
                m2d_unpack_band<R, K>(raw[0], cols, valid, bq);
                m2d_unpack_band<R, K>(raw[1], cols, cload ? valid : 0u, cq);
                m2d_unpack_band<R, K>(raw[2], cols, valid, uu);
                m2d_unpack_band<R, K>(raw[3], cols, valid, dl);
                m2d_rows<R>(p0 + R, H, fr, irow_next);
                if (band + 1 < nbands) fetch(irow_next);
            } else {  // state n0's B and C in flight with u and delta
                m2d_load_band<R, K>(Bbp, sB_h, sB_w, irow, cols, valid, bq);
                m2d_load_band<R, K>(Cbp, sC_h, sC_w, irow, cols, cload ? valid : 0u, cq);
                m2d_load_band<R, K>(ubp, su_h, su_w, irow, cols, valid, uu);
                m2d_load_band<R, K>(dbp_, sd_h, sd_w, irow, cols, valid, dl);
            }
            {
#pragma unroll
                for (int r = 0; r < R; ++r) {
#pragma unroll
                    for (int k = 0; k < K; ++k) {
                        const float v = dl[r][k] + bias;
                        const float t = softplus ? m2d_softplus(v) : v;
                        dt[r][k] = m2d_select(m2d_is_valid(valid, r * K + k), t, 0.f);
                        dtu[r][k] = __fmul_rn(dt[r][k], uu[r][k]);
                        yacc[r][k] = Dd * uu[r][k];
                    }
                }
            }
            if (!ahead && band + 1 < nbands) {  // the next band's inputs into L1 while this one is scanned
                const int p1 = p0 + R, nrow1 = nk > 0 ? min(R, H - p1) : 0, i1 = fr ? (H - 1 - p1) : p1;
                const int stb = fr ? -sB_h : sB_h;
                m2d_prefetch_rows<T, R>(ubp + (i1 * su_h + j * su_w), fr ? -su_h : su_h, nrow1);
                m2d_prefetch_rows<T, R>(dbp_ + (i1 * sd_h + j * sd_w), fr ? -sd_h : sd_h, nrow1);
                m2d_prefetch_rows<T, R>(Bbp + (i1 * sB_h + j * sB_w), stb, nrow1);
                if (cload) m2d_prefetch_rows<T, R>(Cbp + (i1 * sC_h + j * sC_w), fr ? -sC_h : sC_h, nrow1);
            }
            for (int n = n0; n < n1; ++n) {
                const int ln = n - n0;  // the state's index within the block's part
                const float An2 = c.slot_ok ? A[(m2d_i64)d * N + n] * M2D_LOG2E : 0.f;
                float a[R][K], v[R][K];
                if (ln > 0) {
                    m2d_load_band<R, K>(Bbp + ln * sB_n, sB_h, sB_w, irow, cols, valid, bq);
                    m2d_load_band<R, K>(Cbp + ln * sC_n, sC_h, sC_w, irow, cols, cload ? valid : 0u, cq);
                }
#pragma unroll
                for (int r = 0; r < R; ++r) {
#pragma unroll
                    for (int k = 0; k < K; ++k) {
                        a[r][k] = m2d_exp2(dt[r][k] * An2);
                        v[r][k] = __fmul_rn(dtu[r][k], bq[r][k]);
                    }
                }
                float cv[K];
#pragma unroll
                for (int k = 0; k < K; ++k) cv[k] = carry[(ln * K + k) * c.nthr + c.tid];
                if (ckvp != nullptr) m2d_store_row<K>(ckvp + (band * N + n) * W, q, nk, cols.vout, cv);
                if (LAYOUT == M2D_WIDE) {  // one row scan in the code (wide rows: a smaller state loop)
                    if (vh) m2d_colscan_fwd<R, K>(a, v, cv);
                    m2d_rowscan_fwd<R, K, LAYOUT>(c, a, v, aggM, aggV, cinb, ckh, true, tile, n, p0);
                    if (!vh) m2d_colscan_fwd<R, K>(a, v, cv);
                } else if (!vh) {  // one branch per pass order (fewer live registers)
                    m2d_rowscan_fwd<R, K, LAYOUT>(c, a, v, aggM, aggV, cinb, ckh, true, tile, n, p0);
                    m2d_colscan_fwd<R, K>(a, v, cv);
                } else {
                    m2d_colscan_fwd<R, K>(a, v, cv);
                    m2d_rowscan_fwd<R, K, LAYOUT>(c, a, v, aggM, aggV, cinb, ckh, true, tile, n, p0);
                }
#pragma unroll
                for (int k = 0; k < K; ++k) carry[(ln * K + k) * c.nthr + c.tid] = cv[k];
#pragma unroll
                for (int r = 0; r < R; ++r) {
#pragma unroll
                    for (int k = 0; k < K; ++k) yacc[r][k] = fmaf(cq[r][k], v[r][k], yacc[r][k]);  // v holds h
                }
            }
            if (y != nullptr) {
                if (HAS_Z) {
                    float zz[R][K];
                    m2d_load_band<R, K>(zbp, sz_h, sz_w, irow, cols, valid, zz);
#pragma unroll
                    for (int r = 0; r < R; ++r) {
#pragma unroll
                        for (int k = 0; k < K; ++k) yacc[r][k] *= zz[r][k] * m2d_sigmoid(zz[r][k]);
                    }
                }
                m2d_store_band<R, K>(ybp, W, irow, cols, valid, yacc);
            }
            if constexpr (ahead) {
#pragma unroll
                for (int r = 0; r < R; ++r) irow[r] = irow_next[r];
            }
        }
    }
}

// TG: type of du and ddelta (float for the per-part partial sums of a state split).
template <typename T, typename TO, int R, int K, int LAYOUT, bool HAS_Z, typename TG>
__global__ void __launch_bounds__(LAYOUT == M2D_NARROW ? M2D_NARROW_BWD_MAX_THREADS : M2D_MAX_THREADS,
                                  LAYOUT == M2D_NARROW ? M2D_NARROW_BWD_MIN_BLOCKS : M2D_BWD_MIN_BLOCKS)
    mamba2d_scan2d_bwd(const __grid_constant__ M2DScanParams prm) {
    const T* __restrict__ u = static_cast<const T*>(prm.u);
    const T* __restrict__ delta = static_cast<const T*>(prm.delta);
    const T* __restrict__ z = static_cast<const T*>(prm.z);
    const TO* __restrict__ dout = static_cast<const TO*>(prm.dout);
    const T* __restrict__ Bm = static_cast<const T*>(prm.Bm);
    const T* __restrict__ Cm = static_cast<const T*>(prm.Cm);
    const float* __restrict__ A = prm.A;
    const float* __restrict__ Dv = prm.Dv;
    const float* __restrict__ dbias = prm.dbias;
    const float* __restrict__ ckv = prm.ckv;
    float* __restrict__ ckh = prm.ckh;
    float* __restrict__ dck = prm.dck;
    TG* __restrict__ du = static_cast<TG*>(prm.du);
    TG* __restrict__ ddelta = static_cast<TG*>(prm.ddelta);
    T* __restrict__ dz = static_cast<T*>(prm.dz);
    float* __restrict__ dBp = prm.dBp;
    float* __restrict__ dCp = prm.dCp;
    float* __restrict__ dAp = prm.dAp;
    float* __restrict__ dDp = prm.dDp;
    float* __restrict__ dbp = prm.dbp;
    const int &dim = prm.dim, &H = prm.H, &W = prm.W, &G = prm.G, &N = prm.N, &softplus = prm.softplus;
    const m2d_i64 &su_b = prm.su_b, &su_d = prm.su_d;
    const int &su_h = prm.su_h, &su_w = prm.su_w;
    const m2d_i64 &sd_b = prm.sd_b, &sd_d = prm.sd_d;
    const int &sd_h = prm.sd_h, &sd_w = prm.sd_w;
    const m2d_i64 &sz_b = prm.sz_b, &sz_d = prm.sz_d;
    const int &sz_h = prm.sz_h, &sz_w = prm.sz_w;
    const m2d_i64 &so_b = prm.so_b, &so_d = prm.so_d;
    const int &so_h = prm.so_h, &so_w = prm.so_w;
    const m2d_i64 &sB_b = prm.sB_b, &sB_g = prm.sB_g;
    const int &sB_n = prm.sB_n, &sB_h = prm.sB_h, &sB_w = prm.sB_w;
    const m2d_i64 &sC_b = prm.sC_b, &sC_g = prm.sC_g;
    const int &sC_n = prm.sC_n, &sC_h = prm.sC_h, &sC_w = prm.sC_w;
    const int &S = prm.S, &WPM = prm.WPM, &CH = prm.CH, &ntiles = prm.ntiles, &nbands = prm.nbands, &NP = prm.NP;
    const m2d_i64 &nmaps = prm.nmaps;
    const int &vec = prm.vec;
    extern __shared__ float m2d_smem[];
    const M2DCtx c = m2d_make_ctx(dim, H, W, G, N, S, WPM, CH, K, ntiles, nbands);
    // States n0 .. n1 - 1 (blockIdx.y: the part of a state split; du, ddelta, dD, d(delta_bias) are then per-part
    // partial sums, part-major).
    const int n0 = blockIdx.y * NP, n1 = min(N, n0 + NP);
    float* vcar = m2d_smem;                                                      // [NP][K][nthr] adjoint vertical carry
    double* dAacc = reinterpret_cast<double*>(vcar + (m2d_i64)NP * K * c.nthr);  // [NP][nthr] per-thread dA sums
    float* aggM = reinterpret_cast<float*>(dAacc + (m2d_i64)NP * c.nthr);        // [CH][WPM][R]
    float* aggV = aggM + CH * WPM * R;
    float* cinb = aggV + CH * WPM * R;
    // dB/dC of each channel slot before the sum over the block's channels (only when CH > 1): [CH][R][TWs] each,
    // two buffers used in turn so that one barrier per (band, state) suffices (a thread writing the next buffer
    // cannot overtake one still reading the other: both pass the next barrier first).
    float* redB0 = cinb + M2D_PAD4(CH * WPM * R);  // 16-byte aligned for the K-wide stores
    int rbuf = 0;

    const int d = c.g * c.dg + (c.slot_ok ? c.chunk * CH + c.slot : 0);
    const int code = m2d_direction(prm, c.g);
    const bool fr = code & 1, fc = (code >> 1) & 1, vh = (code >> 2) & 1;
    const m2d_i64 map = (m2d_i64)c.b * dim + d;
    const float Dd = (Dv != nullptr && c.slot_ok && blockIdx.y == 0) ? Dv[d] : 0.f;  // D u: in one part only
    const float bias = (dbias != nullptr && c.slot_ok) ? dbias[d] : 0.f;
    const T* ubp = m2d_base(u + (c.b * su_b + d * su_d + m2d_u_offset(prm, c.g)));
    const T* dbp_ = m2d_base(delta + (c.b * sd_b + d * sd_d));
    const T* zbp = HAS_Z ? m2d_base(z + (c.b * sz_b + d * sz_d)) : nullptr;
    const TO* obp = m2d_base(dout + (c.b * so_b + d * so_d + m2d_dout_offset(prm, c.g)));
    const T* Bbp = m2d_base(Bm + (c.b * sB_b + c.g * sB_g));
    const T* Cbp = m2d_base(Cm + (c.b * sC_b + c.g * sC_g));
    const m2d_i64 HW = (m2d_i64)H * W;
    const int cpg = (c.dg + CH - 1) / CH;
    const m2d_i64 pbase = ((m2d_i64)c.b * G + c.g) * cpg + c.chunk;  // partial dB/dC slice of this block
    float* dBpp = m2d_base(dBp + pbase * N * HW);
    float* dCpp = m2d_base(dCp + pbase * N * HW);
    const float* ckvp = m2d_base(ckv + map * nbands * N * W);
    const m2d_i64 pmap = blockIdx.y * nmaps + map;  // the map's slice in the part-major outputs
    TG* dup = m2d_base(du + pmap * HW);
    TG* ddp = m2d_base(ddelta + pmap * HW);
    T* dzp = HAS_Z ? m2d_base(dz + map * HW) : nullptr;

    for (int ln = 0; ln < n1 - n0; ++ln) dAacc[ln * c.nthr + c.tid] = 0.0;
    double dD_acc = 0.0, db_acc = 0.0;  // long sums with cancellation: accumulate in double

    for (int tile = ntiles - 1; tile >= 0; --tile) {
        const int q = tile * c.TWs + c.col * K;  // scan-frame column of the thread's first column
        const int nk = c.slot_ok ? min(K, W - q) : 0;  // valid columns of the thread (<= 0: none)
        const int j = fc ? (W - 1 - q) : q;
        const M2DCols<K> cols = m2d_columns<K>(q, W, fc, vec);
        for (int e = 0; e < (n1 - n0) * K; ++e) vcar[e * c.nthr + c.tid] = 0.f;
        for (int band = nbands - 1; band >= 0; --band) {
            const int p0 = band * R;
            const int nrow = nk > 0 ? min(R, H - p0) : 0;
            int irow[R];
            m2d_rows<R>(p0, H, fr, irow);
            const unsigned valid = m2d_valid_mask<R, K>(nrow, nk);
            float uu[R][K], dt[R][K], dy[R][K], ddt[R][K], dux[R][K], yrec[R][K];
            float sg[R][K];  // d softplus / d(delta) (1 without softplus), kept from the first pass
            {
                float dl[R][K];
                m2d_load_band<R, K>(ubp, su_h, su_w, irow, cols, valid, uu);
                m2d_load_band<R, K>(dbp_, sd_h, sd_w, irow, cols, valid, dl);
                m2d_load_band<R, K>(obp, so_h, so_w, irow, cols, valid, dy);
                if (HAS_Z) {
                    float zz[R][K];
                    m2d_load_band<R, K>(zbp, sz_h, sz_w, irow, cols, valid, zz);
#pragma unroll
                    for (int r = 0; r < R; ++r) {
#pragma unroll
                        for (int k = 0; k < K; ++k) dy[r][k] *= zz[r][k] * m2d_sigmoid(zz[r][k]);
                    }
                }
#pragma unroll
                for (int r = 0; r < R; ++r) {
#pragma unroll
                    for (int k = 0; k < K; ++k) {
                        const float v = dl[r][k] + bias;
                        float gr = 1.f;
                        const float t = softplus ? m2d_softplus_with_grad(v, gr) : v;
                        dt[r][k] = m2d_select(m2d_is_valid(valid, r * K + k), t, 0.f);
                        sg[r][k] = gr;
                        ddt[r][k] = 0.f;
                        dux[r][k] = Dd * dy[r][k];
                        yrec[r][k] = Dd * uu[r][k];
                    }
                }
            }
            if (band > 0) {  // the next band's (the one above) inputs into L1 while this one is scanned
                const int p1 = p0 - R, i1 = fr ? (H - 1 - p1) : p1;
                const int nrow1 = nk > 0 ? R : 0;
                constexpr int PF = sizeof(T) == 4 && LAYOUT == M2D_WARP_ROW ? M2D_PREFETCH_BWD_F32 : M2D_PREFETCH;
                m2d_prefetch_rows<T, R, PF>(ubp + (i1 * su_h + j * su_w), fr ? -su_h : su_h, nrow1);
                m2d_prefetch_rows<T, R, PF>(dbp_ + (i1 * sd_h + j * sd_w), fr ? -sd_h : sd_h, nrow1);
                m2d_prefetch_rows<TO, R, PF>(obp + (i1 * so_h + j * so_w), fr ? -so_h : so_h, nrow1);
                m2d_prefetch_rows<T, R, PF>(Bbp + (i1 * sB_h + j * sB_w), fr ? -sB_h : sB_h, nrow1);
                m2d_prefetch_rows<T, R, PF>(Cbp + (i1 * sC_h + j * sC_w), fr ? -sC_h : sC_h, nrow1);
            }
            for (int n = n0; n < n1; ++n) {
                const int ln = n - n0;  // the state's index within the block's part
                const float An = c.slot_ok ? A[(m2d_i64)d * N + n] : 0.f;
                const float An2 = An * M2D_LOG2E;
                float a[R][K], bv[R][K], g[R][K], h[R][K], dh[R][K], dg[R][K];
                m2d_load_band<R, K>(Bbp + n * sB_n, sB_h, sB_w, irow, cols, valid, bv);
                m2d_load_band<R, K>(Cbp + n * sC_n, sC_h, sC_w, irow, cols, valid, dh);  // C, for now
#pragma unroll
                for (int r = 0; r < R; ++r) {
#pragma unroll
                    for (int k = 0; k < K; ++k) a[r][k] = m2d_exp2(dt[r][k] * An2);
                }
                // Recompute the forward states of this band from the checkpoints.
                float cv[K];
                m2d_load_row<K>(ckvp + (band * N + n) * W, q, W, nk, cols.vout, cv);
                // g: the state after the first pass, h: after both.
#pragma unroll
                for (int r = 0; r < R; ++r) {
#pragma unroll
                    for (int k = 0; k < K; ++k) g[r][k] = __fmul_rn(__fmul_rn(dt[r][k], uu[r][k]), bv[r][k]);
                }
                if (LAYOUT == M2D_WIDE) {  // one row scan in the code, as in the forward
                    if (vh) m2d_colscan_fwd<R, K>(a, g, cv);
                    m2d_copy<R, K>(g, h);
                    m2d_rowscan_fwd<R, K, LAYOUT>(c, a, h, aggM, aggV, cinb, ckh, false, tile, n, p0);
                    if (!vh) {
                        m2d_copy<R, K>(h, g);
                        m2d_colscan_fwd<R, K>(a, h, cv);
                    }
                } else if (!vh) {
                    m2d_rowscan_fwd<R, K, LAYOUT>(c, a, g, aggM, aggV, cinb, ckh, false, tile, n, p0);
                    m2d_copy<R, K>(g, h);
                    m2d_colscan_fwd<R, K>(a, h, cv);
                } else {
                    m2d_colscan_fwd<R, K>(a, g, cv);
                    m2d_copy<R, K>(g, h);
                    m2d_rowscan_fwd<R, K, LAYOUT>(c, a, h, aggM, aggV, cinb, ckh, false, tile, n, p0);
                }
#pragma unroll
                for (int r = 0; r < R; ++r) {
#pragma unroll
                    for (int k = 0; k < K; ++k) {
                        yrec[r][k] = fmaf(dh[r][k], h[r][k], yrec[r][k]);
                        dh[r][k] *= dy[r][k];  // C * dy
                    }
                }
                // Adjoint passes in reverse order (dh: adjoint of h, dg: adjoint of g).
                float tc[K];
#pragma unroll
                for (int k = 0; k < K; ++k) tc[k] = vcar[(ln * K + k) * c.nthr + c.tid];
                if (LAYOUT == M2D_WIDE) {
                    if (!vh) m2d_colscan_rev<R, K>(a, dh, tc);
                    m2d_rowscan_rev<R, K, LAYOUT>(c, a, dh, dg, aggM, aggV, cinb, dck, tile, n, p0);
                    if (vh) {
                        m2d_copy<R, K>(dg, dh);
                        m2d_colscan_rev<R, K>(a, dg, tc);
                    }
                } else if (!vh) {
                    m2d_colscan_rev<R, K>(a, dh, tc);
                    m2d_rowscan_rev<R, K, LAYOUT>(c, a, dh, dg, aggM, aggV, cinb, dck, tile, n, p0);
                } else {
                    m2d_rowscan_rev<R, K, LAYOUT>(c, a, dh, dg, aggM, aggV, cinb, dck, tile, n, p0);
                    m2d_copy<R, K>(dg, dh);  // the row pass ran last: its adjoint is dh's
                    m2d_colscan_rev<R, K>(a, dg, tc);
                }
#pragma unroll
                for (int k = 0; k < K; ++k) vcar[(ln * K + k) * c.nthr + c.tid] = tc[k];
                float dAl = 0.f;
#pragma unroll
                for (int r = 0; r < R; ++r) {
#pragma unroll
                    for (int k = 0; k < K; ++k) {
                        const float x = __fmul_rn(__fmul_rn(dt[r][k], uu[r][k]), bv[r][k]);
                        const float daa = fmaf(dh[r][k], h[r][k] - g[r][k], dg[r][k] * (g[r][k] - x));  // dAbar*Abar
                        const float gb = dg[r][k] * bv[r][k];
                        ddt[r][k] = fmaf(daa, An, fmaf(gb, uu[r][k], ddt[r][k]));
                        dux[r][k] = fmaf(gb, dt[r][k], dux[r][k]);
                        dAl = fmaf(daa, dt[r][k], dAl);
                        g[r][k] = dg[r][k] * dt[r][k] * uu[r][k];  // this channel's dB
                        h[r][k] = dy[r][k] * h[r][k];              // this channel's dC
                    }
                }
                dAacc[ln * c.nthr + c.tid] += (double)dAl;
                if (CH == 1) {
                    m2d_store_band<R, K>(dBpp + (m2d_i64)n * HW, W, irow, cols, valid, g);
                    m2d_store_band<R, K>(dCpp + (m2d_i64)n * HW, W, irow, cols, valid, h);
                } else {
                    float* redB = redB0 + rbuf * (2 * CH * R * c.TWs);
                    float* redC = redB + CH * R * c.TWs;
#pragma unroll
                    for (int r = 0; r < R; ++r) {  // K values per store (aligned: see redB0)
                        const int o = (c.slot * R + r) * c.TWs + c.col * K;
                        m2d_vec<float, K> vb, vc;
#pragma unroll
                        for (int k = 0; k < K; ++k) {
                            vb.e[k] = g[r][k];
                            vc.e[k] = h[r][k];
                        }
                        *reinterpret_cast<m2d_vec<float, K>*>(redB + o) = vb;
                        *reinterpret_cast<m2d_vec<float, K>*>(redC + o) = vc;
                    }
                    __syncthreads();
                    for (int e = c.tid; e < R * c.TWs; e += c.nthr) {
                        const int r = e / c.TWs, cc = e - r * c.TWs;
                        const int p = p0 + r, qq = tile * c.TWs + cc;
                        if (p < H && qq < W) {
                            float sb = 0.f, sc = 0.f;
                            for (int s = 0; s < CH; ++s) {
                                sb += redB[(s * R + r) * c.TWs + cc];
                                sc += redC[(s * R + r) * c.TWs + cc];
                            }
                            const int i = fr ? (H - 1 - p) : p, jj = fc ? (W - 1 - qq) : qq;
                            const int kk = (n * H + i) * W + jj;
                            dBpp[kk] = sb;
                            dCpp[kk] = sc;
                        }
                    }
#if M2D_RED_DBUF
                    rbuf ^= 1;
#else
                    __syncthreads();
#endif
                }
            }
            {
                float zz[R][K], go[R][K];
                if (HAS_Z) {  // d z needs the raw dout and z again (reloaded: L1/L2 hits, fewer live registers)
                    m2d_load_band<R, K>(zbp, sz_h, sz_w, irow, cols, valid, zz);
                    m2d_load_band<R, K>(obp, so_h, so_w, irow, cols, valid, go);
                }
                float dD_band = 0.f, db_band = 0.f;  // a band's few terms in float, the long sums in double
#pragma unroll
                for (int r = 0; r < R; ++r) {
#pragma unroll
                    for (int k = 0; k < K; ++k) {
                        ddt[r][k] *= sg[r][k];  // d(delta)
                        if (HAS_Z) {
                            const float s = m2d_sigmoid(zz[r][k]);
                            yrec[r][k] = go[r][k] * yrec[r][k] * s * (1.f + zz[r][k] * (1.f - s));  // dz
                        }
                        if (m2d_is_valid(valid, r * K + k)) {
                            dD_band = fmaf(dy[r][k], uu[r][k], dD_band);
                            db_band += ddt[r][k];
                        }
                    }
                }
                m2d_store_band<R, K>(dup, W, irow, cols, valid, dux);
                m2d_store_band<R, K>(ddp, W, irow, cols, valid, ddt);
                if (HAS_Z) m2d_store_band<R, K>(dzp, W, irow, cols, valid, yrec);
                dD_acc += (double)dD_band;
                db_acc += (double)db_band;
            }
        }
    }
    // Per-channel reductions over the slot's threads, in a fixed order.
    __syncthreads();
    for (int e = c.tid; e < CH * NP; e += c.nthr) {
        const int s = e / NP, ln = e - s * NP, n = n0 + ln;
        const int chan = c.chunk * CH + s;
        if (chan < c.dg && n < n1) {
            double acc = 0.0;
            for (int cc = 0; cc < c.tps; ++cc) acc += dAacc[ln * c.nthr + s * c.tps + cc];
            dAp[((m2d_i64)c.b * dim + c.g * c.dg + chan) * N + n] = (float)acc;
        }
    }
    __syncthreads();
    double* red2 = reinterpret_cast<double*>(m2d_smem);  // reuse: [2][nthr] doubles fit in vcar + dAacc
    red2[c.tid] = dD_acc;
    red2[c.nthr + c.tid] = db_acc;
    __syncthreads();
    for (int s = c.tid; s < CH; s += c.nthr) {
        const int chan = c.chunk * CH + s;
        if (chan < c.dg) {
            double a0 = 0.0, a1 = 0.0;
            for (int cc = 0; cc < c.tps; ++cc) {
                a0 += red2[s * c.tps + cc];
                a1 += red2[c.nthr + s * c.tps + cc];
            }
            const m2d_i64 k = blockIdx.y * nmaps + (m2d_i64)c.b * dim + c.g * c.dg + chan;
            dDp[k] = (float)a0;
            dbp[k] = (float)a1;
        }
    }
}
