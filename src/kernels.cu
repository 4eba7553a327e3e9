// Fused model kernels for CUDA (src/kernels_cuda.rs launches them; build.rs compiles to PTX).
//
// - causal_softmax_fwd: y = softmax(scale·x) over each row with keys after the query masked, in
//   f32 whatever the storage dtype; one warp per row. Replaces scale, mask add, max, subtract,
//   exp, sum and divide — seven passes over the B·H·T·T attention scores — by one read and one
//   write.
// - softmax_bwd: dx = scale · y ⊙ (dy − Σ dy⊙y), one warp per row (masked entries have y = 0).
// - sum_squares_partials: Σx² per block in f64 (fixed grid, so the same result on every run).

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
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
