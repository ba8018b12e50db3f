// Layer norm over the last, contiguous dimension of short rows (a channels-last feature map's pixels, C <= 1024),
// forward and backward. PyTorch's own kernels give every row a block of 128 threads, most of them idle when C is 48
// or 96 (a small fraction of the memory bandwidth). Here L lanes share a row (a power of two up to 32, several rows
// per warp), each keeping V of its values in registers: the row is read once and written once, mean and variance
// come from the registers in two passes (the variance from deviations to the mean, as exact as PyTorch's Welford
// sums), summed across the row's lanes with shuffles. The backward reads x and dy once, writes dx in the input's
// dtype, and adds the weight and bias gradients per block (in registers or shared memory, see below), leaving one
// row of partial sums per block that the launcher sums in a fixed order (bitwise reproducible).
#include "scan2d_common.cuh"

template <int L>
__device__ __forceinline__ float m2d_row_sum(float v) {
#pragma unroll
    for (int off = L / 2; off > 0; off >>= 1) v += __shfl_xor_sync(M2D_FULL, v, off, L);
    return v;
}

// x: rows x C (row-major), weight/bias: C floats or null, y: rows x C, mean/rstd: one float per row or null (for
// the backward), dev_low: null or rows x C, the deviations x - mean rounded to the output type (what the backward
// keeps when the output is of lower precision than x: half the memory; rounded after centring, so that the error is
// relative to the deviation, which the backward needs, not to x). With a branch (TB, rows x C) the row normalised
// is the residual sum x + scale * branch, written to x_out in x's type: a pre-norm block's residual add, its drop
// path's per-sample scale and the next norm in one pass. Lane l of a row holds columns l + L * i.
template <typename T, typename TB, typename TO, int L, int V>
__global__ void __launch_bounds__(256)
    mamba2d_layer_norm_fwd(const M2DLayerNormParams prm) {
    const T* __restrict__ x = static_cast<const T*>(prm.x);
    const float* __restrict__ weight = prm.weight;
    const float* __restrict__ bias = prm.bias;
    TO* __restrict__ y = static_cast<TO*>(prm.y);
    float* __restrict__ mean_out = prm.mean_out;
    float* __restrict__ rstd_out = prm.rstd_out;
    TO* __restrict__ dev_low = static_cast<TO*>(prm.dev_low);
    const m2d_i64 rows = prm.rows;
    const int C = prm.C;
    const float eps = prm.eps;
    const m2d_i64 row = ((m2d_i64)blockIdx.x * blockDim.x + threadIdx.x) / L;
    const int lane = threadIdx.x % L;
    const bool row_ok = row < rows;  // a whole row's lanes agree, so the shuffles below see only their own row
    const T* xr = x + (row_ok ? row : 0) * C;
    const TB* branch = static_cast<const TB*>(prm.branch);
    const TB* br = branch != nullptr ? branch + (row_ok ? row : 0) * C : nullptr;
    const float s = (br != nullptr && prm.scale != nullptr && row_ok) ? prm.scale[row / prm.rows_per_sample] : 1.f;
    float v[V];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        const int c = lane + L * i;
        const bool ok = row_ok && c < C;
        v[i] = ok ? m2d_to_f(xr[c]) : 0.f;
        if (br != nullptr && ok) v[i] = fmaf(s, m2d_to_f(br[c]), v[i]);  // s = 1: exactly x + branch
        sum += v[i];
    }
    const float mean = m2d_row_sum<L>(sum) / C;
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        const float d = lane + L * i < C ? v[i] - mean : 0.f;
        sq = fmaf(d, d, sq);
    }
    const float rstd = rsqrtf(m2d_row_sum<L>(sq) / C + eps);
    if (!row_ok) return;
    if (mean_out != nullptr && lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
    TO* yr = y + row * C;
    TO* dlr = dev_low != nullptr ? dev_low + row * C : nullptr;
    T* out_sum = br != nullptr ? static_cast<T*>(prm.x_out) + row * C : nullptr;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        const int c = lane + L * i;
        if (c < C) {
            if (out_sum != nullptr) out_sum[c] = m2d_from_f<T>(v[i]);
            if (dlr != nullptr) dlr[c] = m2d_from_f<TO>(v[i] - mean);
            float out = (v[i] - mean) * rstd;
            if (weight != nullptr) out *= weight[c];
            if (bias != nullptr) out += bias[c];
            yr[c] = m2d_from_f<TO>(out);
        }
    }
}

// Backward from the forward's mean and 1/std: per row, with xh = (x - mean) * rstd (mean null: x holds the
// deviations already) and g = dy * weight,
// dx = rstd * (g - mean(g) - xh * mean(g * xh)); each row group adds dy * xh and dy of its rows into its own sums of
// the weight and bias gradients, and the block leaves the sum over its row groups in dw_part and db_part at the
// block's row. Rows go to the blocks' row groups in turn (a grid-stride loop), so a block's partial sums cover a
// fixed set of rows, added in a fixed order. Short rows (at most 8 values per lane) keep their sums in registers;
// longer rows keep them in shared memory, one slot per row group and column, so that the registers hold one row
// only and enough warps fit on an SM to hide the loads' latency. Shared memory: 2 * 256 * V floats. The norm of a
// residual sum (the forward's branch) adds the sum's other gradient dres to dx and writes the branch's gradient,
// dx times its sample's scale, in the branch's type TB.
template <typename T, typename TX, typename TB, int L, int V>
__global__ void __launch_bounds__(256)
    mamba2d_layer_norm_bwd(const M2DLayerNormBwdParams prm) {
    const T* __restrict__ x = static_cast<const T*>(prm.x);
    const T* __restrict__ dy = static_cast<const T*>(prm.dy);
    const float* __restrict__ weight = prm.weight;
    const float* __restrict__ mean_in = prm.mean;
    const float* __restrict__ rstd_in = prm.rstd;
    TX* __restrict__ dx = static_cast<TX*>(prm.dx);
    const m2d_i64 rows = prm.rows;
    const int C = prm.C;
    extern __shared__ float m2d_smem[];
    constexpr bool kSumsInRegisters = V <= 8;
    constexpr int kWidth = L * V;
    const int groups = blockDim.x / L, group = threadIdx.x / L, lane = threadIdx.x % L;
    float* const sum_w = m2d_smem + group * kWidth;  // this row group's sums: dw, then (groups rows later) db
    float* const sum_b = m2d_smem + (groups + group) * kWidth;
    const float inv_c = 1.f / C;
    float gw[kSumsInRegisters ? V : 1], gb[kSumsInRegisters ? V : 1];
#pragma unroll
    for (int i = 0; i < V; ++i) {
        if constexpr (kSumsInRegisters) {
            gw[i] = 0.f;
            gb[i] = 0.f;
        } else {
            sum_w[lane + L * i] = 0.f;
            sum_b[lane + L * i] = 0.f;
        }
    }
    // The block's row groups step through the rows together (the loop's condition is the same for the whole
    // block), so a warp's lanes all reach the shuffles, also where some of its row groups are past the last row.
    const m2d_i64 stride = (m2d_i64)gridDim.x * groups;
    for (m2d_i64 first = (m2d_i64)blockIdx.x * groups; first < rows; first += stride) {
        const m2d_i64 row = first + group;
        const bool row_ok = row < rows;
        const T* xr = x + (row_ok ? row : 0) * C;
        const T* dr = dy + (row_ok ? row : 0) * C;
        const float mean = (row_ok && mean_in != nullptr) ? mean_in[row] : 0.f, rstd = row_ok ? rstd_in[row] : 0.f;
        float xh[V], g[V];
        float sg = 0.f, sgx = 0.f;
#pragma unroll
        for (int i = 0; i < V; ++i) {
            const int c = lane + L * i;
            const bool ok = row_ok && c < C;
            const float d = ok ? m2d_to_f(dr[c]) : 0.f;
            xh[i] = ok ? (m2d_to_f(xr[c]) - mean) * rstd : 0.f;
            g[i] = (weight != nullptr && ok) ? d * __ldg(weight + c) : d;
            sg += g[i];
            sgx = fmaf(g[i], xh[i], sgx);
            if constexpr (kSumsInRegisters) {
                gw[i] = fmaf(d, xh[i], gw[i]);
                gb[i] += d;
            } else {
                sum_w[lane + L * i] = fmaf(d, xh[i], sum_w[lane + L * i]);
                sum_b[lane + L * i] += d;
            }
        }
        const float mg = m2d_row_sum<L>(sg) * inv_c, mgx = m2d_row_sum<L>(sgx) * inv_c;
        if (!row_ok) continue;
        TX* dxr = dx + row * C;
        const TX* dresr = prm.dres != nullptr ? static_cast<const TX*>(prm.dres) + row * C : nullptr;
        TB* dbr = prm.dbranch != nullptr ? static_cast<TB*>(prm.dbranch) + row * C : nullptr;
        const float s = (dbr != nullptr && prm.scale != nullptr) ? prm.scale[row / prm.rows_per_sample] : 1.f;
#pragma unroll
        for (int i = 0; i < V; ++i) {
            const int c = lane + L * i;
            if (c < C) {
                float d = rstd * (g[i] - mg - xh[i] * mgx);
                if (dresr != nullptr) d += m2d_to_f(dresr[c]);
                dxr[c] = m2d_from_f<TX>(d);
                if (dbr != nullptr) dbr[c] = m2d_from_f<TB>(d * s);
            }
        }
    }
    if constexpr (kSumsInRegisters) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
            sum_w[lane + L * i] = gw[i];
            sum_b[lane + L * i] = gb[i];
        }
    }
    __syncthreads();
    // the row groups' sums, added in group order for each column (a fixed order: no atomics)
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float w = 0.f, b = 0.f;
        for (int r = 0; r < groups; ++r) {
            w += m2d_smem[r * kWidth + c];
            b += m2d_smem[(groups + r) * kWidth + c];
        }
        prm.dw_part[(m2d_i64)blockIdx.x * C + c] = w;
        prm.db_part[(m2d_i64)blockIdx.x * C + c] = b;
    }
}
