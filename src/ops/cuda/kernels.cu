// Fused model kernels for CUDA (each op file under src/ops/ launches its own from a `cuda_kernels`
// module; build.rs compiles this file to PTX).
//
// - causal_softmax_fwd: y = softmax(scale·x) over each row with keys after the query masked, in
//   f32 whatever the storage dtype; one warp per row. Replaces scale, mask add, max, subtract,
//   exp, sum and divide — seven passes over the B·H·T·T attention scores — by one read and one
//   write.
// - softmax_bwd: dx = scale · y ⊙ (dy − Σ dy⊙y), one warp per row (masked entries have y = 0).
// - sum_squares_partials: Σx² per block in f64 (fixed grid, so the same result on every run).
// - gelu_fwd / gelu_bwd: GPT-2's tanh-GELU and its derivative, elementwise, in f32.
// - layernorm_fwd / layernorm_bwd_dx / layernorm_bwd_params: LayerNorm over rows of f32, one warp
//   per row; the weight and bias gradients as per-chunk column sums (deterministic, no atomics).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstddef>
#include <cstdint>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// x, y: `rows` rows of `tk` keys; row r is query i = r mod tq, which sees keys j <= i + tk − tq.
template <typename T>
__device__ void causal_softmax_fwd(const T* __restrict__ x, T* __restrict__ y, size_t rows, int tq,
                                   int tk, float scale) {
    const size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const int last = (int)(row % tq) + (tk - tq);
    const T* xr = x + row * tk;
    T* yr = y + row * tk;
    float m = -INFINITY;
    for (int j = lane; j <= last; j += 32) m = fmaxf(m, to_f32(xr[j]) * scale);
    m = warp_max(m);
    float s = 0.f;
    for (int j = lane; j <= last; j += 32) s += expf(to_f32(xr[j]) * scale - m);
    s = warp_sum(s);
    const float inv = 1.f / s;
    for (int j = lane; j < tk; j += 32)
        yr[j] = from_f32<T>(j <= last ? expf(to_f32(xr[j]) * scale - m) * inv : 0.f);
}

template <typename T>
__device__ void softmax_bwd(const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx,
                            size_t rows, int n, float scale) {
    const size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* yr = y + row * n;
    const T* dyr = dy + row * n;
    T* dxr = dx + row * n;
    float dot = 0.f;
    for (int j = lane; j < n; j += 32) dot += to_f32(dyr[j]) * to_f32(yr[j]);
    dot = warp_sum(dot);
    for (int j = lane; j < n; j += 32)
        dxr[j] = from_f32<T>(scale * to_f32(yr[j]) * (to_f32(dyr[j]) - dot));
}

// One f64 partial sum per block over a grid-stride slice; blockDim.x must be 256.
template <typename T>
__device__ void sum_squares_partials(const T* __restrict__ x, size_t n, double* __restrict__ out) {
    __shared__ double shared[256];
    double acc = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const double v = (double)to_f32(x[i]);
        acc += v * v;
    }
    shared[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = 128; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = shared[0];
}

// The constants and operation order of gelu_value / gelu_derivative in ops/gelu.rs.
#define GELU_C 0.7978845608028654f
#define GELU_A 0.044715f

template <typename T>
__device__ void gelu_fwd(const T* __restrict__ x, T* __restrict__ y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float v = to_f32(x[i]);
        y[i] = from_f32<T>((((tanhf((v * v * GELU_A + 1.f) * v * GELU_C) + 1.f) * 0.5f) * v));
    }
}

template <typename T>
__device__ void gelu_bwd(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                         size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float v = to_f32(x[i]);
        const float t = tanhf(GELU_C * (v + GELU_A * v * v * v));
        const float d = 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * GELU_C * (1.f + 3.f * GELU_A * v * v);
        dx[i] = from_f32<T>(d * to_f32(dy[i]));
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                 \
    extern "C" __global__ void causal_softmax_fwd_##SUFFIX(const T* x, T* y, size_t rows,       \
                                                            int tq, int tk, float scale) {      \
        causal_softmax_fwd<T>(x, y, rows, tq, tk, scale);                                      \
    }                                                                                          \
    extern "C" __global__ void softmax_bwd_##SUFFIX(const T* y, const T* dy, T* dx, size_t rows, \
                                                     int n, float scale) {                     \
        softmax_bwd<T>(y, dy, dx, rows, n, scale);                                             \
    }                                                                                          \
    extern "C" __global__ void sum_squares_partials_##SUFFIX(const T* x, size_t n, double* out) { \
        sum_squares_partials<T>(x, n, out);                                                    \
    }                                                                                          \
    extern "C" __global__ void gelu_fwd_##SUFFIX(const T* x, T* y, size_t n) {                 \
        gelu_fwd<T>(x, y, n);                                                                  \
    }                                                                                          \
    extern "C" __global__ void gelu_bwd_##SUFFIX(const T* x, const T* dy, T* dx, size_t n) {   \
        gelu_bwd<T>(x, dy, dx, n);                                                             \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)

// Mean and 1/sqrt(var + eps) of one row, by a warp.
__device__ __forceinline__ void row_stats(const float* __restrict__ xr, int c, float eps, int lane,
                                          float* mean, float* rstd) {
    float s = 0.f;
    for (int j = lane; j < c; j += 32) s += xr[j];
    const float m = warp_sum(s) / c;
    float v = 0.f;
    for (int j = lane; j < c; j += 32) {
        const float d = xr[j] - m;
        v += d * d;
    }
    *mean = m;
    *rstd = 1.f / sqrtf(warp_sum(v) / c + eps);
}

// y = (x − mean)·rstd·w + b per row of c; b may be null (no bias).
extern "C" __global__ void layernorm_fwd_f32(const float* __restrict__ x, const float* __restrict__ w,
                                             const float* __restrict__ b, float* __restrict__ y,
                                             size_t rows, int c, float eps) {
    const size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float* xr = x + row * c;
    float* yr = y + row * c;
    float mean, rstd;
    row_stats(xr, c, eps, lane, &mean, &rstd);
    for (int j = lane; j < c; j += 32) {
        const float v = (xr[j] - mean) * rstd * w[j];
        yr[j] = b ? v + b[j] : v;
    }
}

// Each row's mean and rstd (2 floats per row), for layernorm_bwd_params.
extern "C" __global__ void layernorm_stats_f32(const float* __restrict__ x, float* __restrict__ stats,
                                               size_t rows, int c, float eps) {
    const size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    float mean, rstd;
    row_stats(x + row * c, c, eps, lane, &mean, &rstd);
    if (lane == 0) {
        stats[2 * row] = mean;
        stats[2 * row + 1] = rstd;
    }
}

// dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) with g = dy·w, per row.
extern "C" __global__ void layernorm_bwd_dx_f32(const float* __restrict__ x, const float* __restrict__ w,
                                                const float* __restrict__ dy, float* __restrict__ dx,
                                                size_t rows, int c, float eps) {
    const size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float* xr = x + row * c;
    const float* dyr = dy + row * c;
    float* dxr = dx + row * c;
    float mean, rstd;
    row_stats(xr, c, eps, lane, &mean, &rstd);
    float sum_g = 0.f, sum_gx = 0.f;
    for (int j = lane; j < c; j += 32) {
        const float g = dyr[j] * w[j];
        sum_g += g;
        sum_gx += g * (xr[j] - mean) * rstd;
    }
    const float mean_g = warp_sum(sum_g) / c;
    const float mean_gx = warp_sum(sum_gx) / c;
    for (int j = lane; j < c; j += 32) {
        const float xhat = (xr[j] - mean) * rstd;
        dxr[j] = rstd * (dyr[j] * w[j] - mean_g - xhat * mean_gx);
    }
}

// Column sums over a chunk of rows: partials[0][chunk][j] = Σ dy·x̂ (weight), partials[1][chunk][j]
// = Σ dy (bias). Grid: (ceil(c/256), chunks); each thread owns a column, rows in order.
extern "C" __global__ void layernorm_bwd_params_f32(const float* __restrict__ x, const float* __restrict__ dy,
                                                    const float* __restrict__ stats,
                                                    float* __restrict__ partials, size_t rows, int c,
                                                    int rows_per_chunk) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    const size_t chunk = blockIdx.y;
    const size_t chunks = gridDim.y;
    const size_t first = chunk * rows_per_chunk;
    const size_t last = min(rows, first + rows_per_chunk);
    float dw = 0.f, db = 0.f;
    for (size_t r = first; r < last; ++r) {
        const float g = dy[r * c + j];
        dw += g * (x[r * c + j] - stats[2 * r]) * stats[2 * r + 1];
        db += g;
    }
    partials[chunk * c + j] = dw;
    partials[(chunks + chunk) * c + j] = db;
}

// Block-wide max and sum over 256 threads (8 warps).
__device__ __forceinline__ float block_reduce(float v, bool is_max, float* shared) {
    v = is_max ? warp_max(v) : warp_sum(v);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float r = shared[0];
    for (int w = 1; w < (int)(blockDim.x / 32); ++w) r = is_max ? fmaxf(r, shared[w]) : r + shared[w];
    return r;
}

// log Σ exp of one row of v logits, by a block of 256 threads.
template <typename T>
__device__ float row_log_sum_exp(const T* __restrict__ row, int v, float* shared) {
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, to_f32(row[j]));
    m = block_reduce(m, true, shared);
    float s = 0.f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(to_f32(row[j]) - m);
    return m + logf(block_reduce(s, false, shared));
}

// Per-row cross-entropy −log softmax(x)[t], one block per row (a target outside [0, v) gives NaN).
template <typename T>
__device__ void cross_entropy_rows(const T* __restrict__ logits, const uint32_t* __restrict__ targets,
                                   float* __restrict__ losses, int v) {
    __shared__ float shared[32];
    const size_t row = blockIdx.x;
    const T* x = logits + row * v;
    const float lse = row_log_sum_exp(x, v, shared);
    if (threadIdx.x == 0) {
        const uint32_t t = targets[row];
        losses[row] = t < (uint32_t)v ? lse - to_f32(x[t]) : NAN;
    }
}

// The mean of n per-row losses, summed in row order by one thread (deterministic; n ≤ a few 10⁵).
extern "C" __global__ void mean_f32(const float* __restrict__ x, size_t n, float* __restrict__ out) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        double s = 0.0;
        for (size_t i = 0; i < n; ++i) s += x[i];
        out[0] = (float)(s / n);
    }
}

// dlogits = (softmax(x) − onehot(t)) · upstream / n, one block per row.
template <typename T>
__device__ void cross_entropy_grad(const T* __restrict__ logits, const uint32_t* __restrict__ targets,
                                   const float* __restrict__ upstream, T* __restrict__ grad, size_t n,
                                   int v) {
    __shared__ float shared[32];
    const size_t row = blockIdx.x;
    const T* x = logits + row * v;
    T* g = grad + row * v;
    const float lse = row_log_sum_exp(x, v, shared);
    const float scale = upstream[0] / (float)n;
    const uint32_t t = targets[row];
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        const float p = expf(to_f32(x[j]) - lse);
        g[j] = from_f32<T>((p - (j == (int)t ? 1.f : 0.f)) * scale);
    }
}

#define INSTANTIATE_CE(T, SUFFIX)                                                              \
    extern "C" __global__ void cross_entropy_rows_##SUFFIX(const T* logits, const uint32_t* targets, \
                                                           float* losses, int v) {             \
        cross_entropy_rows<T>(logits, targets, losses, v);                                     \
    }                                                                                          \
    extern "C" __global__ void cross_entropy_grad_##SUFFIX(const T* logits, const uint32_t* targets, \
                                                           const float* upstream, T* grad,     \
                                                           size_t n, int v) {                  \
        cross_entropy_grad<T>(logits, targets, upstream, grad, n, v);                          \
    }

INSTANTIATE_CE(float, f32)
INSTANTIATE_CE(__nv_bfloat16, bf16)
INSTANTIATE_CE(__half, f16)
