// Fused optimizer steps for CUDA: one kernel launch per parameter tensor, one pass over θ, g, m
// and v. The rules are exactly those of `apply_slices_portable` in kernel.rs, with the same
// coefficients (computed on the host in f64, then rounded to T) and the same operation order;
// build.rs compiles this file with --fmad=false so that no multiply-add is contracted, which makes
// the f32 results equal the CPU kernel's (sqrt and division are IEEE-rounded on both).

#include <cstddef>

template <typename T>
__device__ __forceinline__ T lerp_torch(T start, T end, T weight) {
    // torch.lerp's branch: keeps f64 results equal to PyTorch's to the last bit.
    return weight < T(0.5) ? start + weight * (end - start) : end - (end - start) * (T(1) - weight);
}

// Adam/AdamW: g ← g + wd·θ; θ ← θ·decay; m ← lerp(m, g, w); v ← β2·v + (1−β2)·g²;
// θ ← θ − step_size·m / (sqrt(v)/bc2 + eps).
template <typename T>
__device__ void adam_step(T* __restrict__ theta, const T* __restrict__ grad, T* __restrict__ m,
                          T* __restrict__ v, size_t n, T w, T beta2, T one_minus_beta2, T eps, T wd,
                          T decay, T step_size, T bc2, int has_wd, int has_decay) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        T th = theta[i];
        T g = grad[i];
        if (has_wd) g = g + wd * th;
        if (has_decay) th = th * decay;
        T mi = lerp_torch(m[i], g, w);
        T vi = v[i] * beta2 + one_minus_beta2 * g * g;
        T denom = sqrt(vi) / bc2 + eps;
        theta[i] = th - step_size * mi / denom;
        m[i] = mi;
        v[i] = vi;
    }
}

// ADOPT's first step: g ← g + wd·θ; θ ← θ + α·θ; v ← g².
template <typename T>
__device__ void adopt_init(T* __restrict__ theta, const T* __restrict__ grad, T* __restrict__ v,
                           size_t n, T wd, T alpha, int has_wd, int has_decay) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        T th = theta[i];
        T g = grad[i];
        if (has_wd) g = g + wd * th;
        if (has_decay) theta[i] = th + alpha * th;
        v[i] = g * g;
    }
}

// ADOPT: g ← g + wd·θ; θ ← θ + α·θ; ĝ ← clamp(g / max(sqrt(v), eps), ±clip);
// m ← lerp(m, ĝ, w); θ ← θ − lr·m; v ← β2·v + (1−β2)·g².
template <typename T>
__device__ void adopt_step(T* __restrict__ theta, const T* __restrict__ grad, T* __restrict__ m,
                           T* __restrict__ v, size_t n, T w, T beta2, T one_minus_beta2, T eps, T wd,
                           T alpha, T lr, T clip, int has_wd, int has_decay, int has_clip) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        T th = theta[i];
        T g = grad[i];
        if (has_wd) g = g + wd * th;
        if (has_decay) th = th + alpha * th;
        T sqrt_v = sqrt(v[i]);
        T normed = g / (sqrt_v < eps ? eps : sqrt_v);
        if (has_clip) {
            // Comparisons, not fmin/fmax: NaN stays NaN, as in torch.clamp and the CPU kernel.
            if (normed < -clip) normed = -clip;
            else if (normed > clip) normed = clip;
        }
        T mi = lerp_torch(m[i], normed, w);
        theta[i] = th - lr * mi;
        m[i] = mi;
        v[i] = v[i] * beta2 + one_minus_beta2 * g * g;
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                   \
    extern "C" __global__ void adam_step_##SUFFIX(                                               \
        T* theta, const T* grad, T* m, T* v, size_t n, T w, T beta2, T one_minus_beta2, T eps,   \
        T wd, T decay, T step_size, T bc2, int has_wd, int has_decay) {                          \
        adam_step<T>(theta, grad, m, v, n, w, beta2, one_minus_beta2, eps, wd, decay, step_size, \
                     bc2, has_wd, has_decay);                                                    \
    }                                                                                            \
    extern "C" __global__ void adopt_init_##SUFFIX(T* theta, const T* grad, T* v, size_t n, T wd, \
                                                   T alpha, int has_wd, int has_decay) {         \
        adopt_init<T>(theta, grad, v, n, wd, alpha, has_wd, has_decay);                          \
    }                                                                                            \
    extern "C" __global__ void adopt_step_##SUFFIX(                                              \
        T* theta, const T* grad, T* m, T* v, size_t n, T w, T beta2, T one_minus_beta2, T eps,   \
        T wd, T alpha, T lr, T clip, int has_wd, int has_decay, int has_clip) {                  \
        adopt_step<T>(theta, grad, m, v, n, w, beta2, one_minus_beta2, eps, wd, alpha, lr, clip, \
                      has_wd, has_decay, has_clip);                                              \
    }

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)
