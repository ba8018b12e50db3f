// Layer norm over the last, contiguous dimension of short rows (a channels-last feature map's pixels, C <= 1024),
// forward; PyTorch's backward runs from the mean and 1/std it writes. PyTorch's own kernel gives every row a block
// of 128 threads, most of them idle when C is 48 or 96 (a small fraction of the memory bandwidth). Here L lanes share a row (a power of two up to 32, several rows per warp), each keeping V of its
// values in registers: the row is read once and written once, mean and variance come from the registers in two
// passes (the variance from deviations to the mean, as exact as PyTorch's Welford sums), summed across the row's
// lanes with shuffles.
#include "scan2d_common.cuh"

template <int L>
__device__ __forceinline__ float m2d_row_sum(float v) {
#pragma unroll
    for (int off = L / 2; off > 0; off >>= 1) v += __shfl_xor_sync(M2D_FULL, v, off, L);
    return v;
}

// x: rows x C (row-major), weight/bias: C floats or null, y: rows x C, mean/rstd: one float per row or null (for
// the backward), x_low: null or rows x C, x rounded to the output type (what the backward keeps when the output is
// of lower precision than x: half the memory, the precision of the output). Lane l of a row holds columns l + L * i.
template <typename T, typename TO, int L, int V>
__global__ void __launch_bounds__(256)
    mamba2d_layer_norm_fwd(const M2DLayerNormParams prm) {
    const T* __restrict__ x = static_cast<const T*>(prm.x);
    const float* __restrict__ weight = prm.weight;
    const float* __restrict__ bias = prm.bias;
    TO* __restrict__ y = static_cast<TO*>(prm.y);
    float* __restrict__ mean_out = prm.mean_out;
    float* __restrict__ rstd_out = prm.rstd_out;
    TO* __restrict__ x_low = static_cast<TO*>(prm.x_low);
    const m2d_i64 rows = prm.rows;
    const int C = prm.C;
    const float eps = prm.eps;
    const m2d_i64 row = ((m2d_i64)blockIdx.x * blockDim.x + threadIdx.x) / L;
    const int lane = threadIdx.x % L;
    const bool row_ok = row < rows;  // a whole row's lanes agree, so the shuffles below see only their own row
    const T* xr = x + (row_ok ? row : 0) * C;
    float v[V];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        const int c = lane + L * i;
        v[i] = (row_ok && c < C) ? m2d_to_f(xr[c]) : 0.f;
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
    TO* xlr = x_low != nullptr ? x_low + row * C : nullptr;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        const int c = lane + L * i;
        if (c < C) {
            if (xlr != nullptr) xlr[c] = m2d_from_f<TO>(v[i]);
            float out = (v[i] - mean) * rstd;
            if (weight != nullptr) out *= weight[c];
            if (bias != nullptr) out += bias[c];
            yr[c] = m2d_from_f<TO>(out);
        }
    }
}
