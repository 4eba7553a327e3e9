//! What the CPU kernels' loops share to vectorize: an f32 exp that LLVM can vectorize
//! ([`FastExp`]), lane-wise sums, dot products and maxima, and run-time AVX-512/AVX2 dispatch
//! (`multiversioned!`).

use num_traits::Float;
use std::mem::MaybeUninit;

/// Element types with an exp that vectorizes: for f32 a polynomial (libm's `expf` is a call per
/// element, which no loop around it can vectorize), for f64 libm's.
pub trait FastExp: Float + Send + Sync + 'static {
    /// e^x for x ≤ 88; NaN stays NaN.
    fn fast_exp(self) -> Self;
}

impl FastExp for f64 {
    #[inline(always)]
    fn fast_exp(self) -> f64 {
        self.exp()
    }
}

impl FastExp for f32 {
    /// e^x as Cephes' `expf` computes it: x = n·ln 2 + r with |r| ≤ ln 2 / 2 (ln 2 split in two
    /// for an exact product), a degree-7 polynomial for e^r, and 2^n written into the exponent
    /// bits. Within 2 ulp of e^x for normal results; x below ln(f32::MIN_POSITIVE) gives
    /// f32::MIN_POSITIVE (1.2e-38) where libm gives subnormals and then 0.
    #[inline(always)]
    fn fast_exp(self) -> f32 {
        let x = self.clamp(-87.336_55, 88.0);
        // Round to nearest by adding and subtracting 1.5·2²³ (no call to floor, which the
        // baseline x86-64 instruction set lacks). The sum's low mantissa bits hold 2²² + n.
        const ROUND: f32 = 12_582_912.0;
        let shifted = x * std::f32::consts::LOG2_E + ROUND;
        let n = shifted - ROUND;
        let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
        let mut p = 1.987_569_1e-4_f32;
        p = p * r + 1.398_199_9e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 1.666_666_5e-1;
        p = p * r + 0.5;
        let e_r = p * r * r + r + 1.0;
        // 2ⁿ from those bits: shifted left by 23, 2²² + n + 127 leaves n + 127 (in [1, 254] for
        // n in [-126, 127]) in the exponent field, with integer ops only (a float-to-int `as`
        // saturates, which does not vectorize). A NaN x makes e_r NaN whatever the power.
        e_r * f32::from_bits(shifted.to_bits().wrapping_add(127) << 23)
    }
}

/// Defines a function that runs its body compiled for AVX-512F, else AVX2 with FMA, else the
/// baseline, chosen at run time. The kernels' loops are plain Rust, which LLVM vectorizes for the
/// instructions enabled where it compiles them (a closure passed to such a wrapper is not
/// inlined into it, and so is not).
macro_rules! multiversioned {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<$t:ident: $bound:path>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name<$t: $bound>($($arg: $ty),*) {
            #[inline(always)]
            fn portable<$t: $bound>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512<$t: $bound>($($arg: $ty),*) {
                    portable($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$t: $bound>($($arg: $ty),*) {
                    portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F, checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports AVX2 and FMA, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}
pub(crate) use multiversioned;

/// Lanes of the partial sums below: one AVX-512 register of f32.
pub(crate) const LANES: usize = 16;

/// The [`LANES`] partial results combined pairwise (lanes 0-7 with 8-15, then 0-3 with 4-7, …):
/// four dependent steps, which LLVM turns into shuffles, instead of fifteen in a running fold
/// (which made up much of a short softmax row's time).
#[inline(always)]
pub(crate) fn reduce_lanes<T: Copy>(mut acc: [T; LANES], op: impl Fn(T, T) -> T) -> T {
    let mut width = LANES / 2;
    while width > 0 {
        for j in 0..width {
            acc[j] = op(acc[j], acc[j + width]);
        }
        width /= 2;
    }
    acc[0]
}

/// Σ xs with [`LANES`] independent partial sums, which vectorize (one running sum cannot: its
/// order of additions is fixed). The result is the same on every run.
#[inline(always)]
pub(crate) fn sum_lanes<T: Float>(xs: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = acc[j] + c[j];
        }
    }
    let total = reduce_lanes(acc, |a, b| a + b);
    rest.iter().fold(total, |s, &r| s + r)
}

/// Σ f(xᵢ, yᵢ) over two equally long slices, with [`LANES`] independent partial sums, as
/// [`sum_lanes`].
#[inline(always)]
pub(crate) fn sum_zip_lanes<T: Float>(xs: &[T], ys: &[T], f: impl Fn(T, T) -> T) -> T {
    let mut acc = [T::zero(); LANES];
    let (xc, yc) = (xs.chunks_exact(LANES), ys.chunks_exact(LANES));
    let (x_rest, y_rest) = (xc.remainder(), yc.remainder());
    for (x, y) in xc.zip(yc) {
        for j in 0..LANES {
            acc[j] = acc[j] + f(x[j], y[j]);
        }
    }
    let total = reduce_lanes(acc, |a, b| a + b);
    x_rest
        .iter()
        .zip(y_rest)
        .fold(total, |s, (&x, &y)| s + f(x, y))
}

/// Σ xs·ys over the shorter length, with [`LANES`] independent partial sums, as [`sum_lanes`].
#[inline(always)]
pub(crate) fn dot_lanes<T: Float>(xs: &[T], ys: &[T]) -> T {
    let n = xs.len().min(ys.len());
    sum_zip_lanes(&xs[..n], &ys[..n], |x, y| x * y)
}

/// max(xs) (−∞ when empty) with [`LANES`] independent partial maxima.
#[inline(always)]
pub(crate) fn max_lanes<T: Float>(xs: &[T]) -> T {
    let mut acc = [T::neg_infinity(); LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = acc[j].max(c[j]);
        }
    }
    let m = reduce_lanes(acc, T::max);
    rest.iter().fold(m, |m, &r| m.max(r))
}

/// f32 values that round to bf16.
pub(crate) trait ToBf16: Copy + Send + Sync {
    fn f32_bits(self) -> u32;
}

impl ToBf16 for f32 {
    #[inline(always)]
    fn f32_bits(self) -> u32 {
        self.to_bits()
    }
}

/// `x` rounded to bf16, as the 16 bits of each value: round to nearest, ties to even (as
/// `half::bf16::from_f32`, PyTorch and the AMX/AVX512-BF16 conversions do), NaN kept NaN.
#[inline(always)]
pub(crate) fn bf16_bits(bits: u32) -> u16 {
    let is_nan = (bits & 0x7fff_ffff) > 0x7f80_0000;
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    // A quiet NaN with the sign kept: rounding could carry a NaN's low payload into infinity.
    if is_nan {
        ((bits >> 16) as u16) | 0x0040
    } else {
        rounded
    }
}

multiversioned! {
    /// out[i] = x[i] rounded to bf16 ([`bf16_bits`]), vectorized; `out` may be uninitialised.
    pub(crate) fn round_to_bf16<T: ToBf16>(x: &[T], out: &mut [MaybeUninit<u16>]) {
        let n = x.len().min(out.len());
        let (x, out) = (&x[..n], &mut out[..n]);
        for i in 0..n {
            out[i].write(bf16_bits(x[i].f32_bits()));
        }
    }
}

/// `x` rounded to bf16 ([`round_to_bf16`]), split over rayon's threads.
pub(crate) fn to_bf16_parallel(x: &[f32]) -> Vec<u16> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    // SAFETY: the chunks cover every element, and round_to_bf16 writes each of its chunk's.
    unsafe {
        written_vec(x.len(), |out| {
            out.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(o, x)| round_to_bf16(x, o))
        })
    }
}

/// A bf16 vector of `n` values computed in f32 by `compute(start, chunk)`, one chunk of `chunk`
/// elements from `start` at a time (the last one shorter), and rounded as [`round_to_bf16`]
/// rounds: the f32 values only pass through a per-task buffer in cache. For ops whose output
/// only a bf16 matmul reads, which would round it first thing: the values are the same, and the
/// f32 output's write and the rounding's read of it are saved.
///
/// # Safety
/// `compute` writes every element of the chunk it is given.
pub(crate) unsafe fn rounded_by_chunks(
    n: usize,
    chunk: usize,
    compute: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<half::bf16> {
    use rayon::prelude::*;
    // SAFETY: the chunks cover every element, and round_to_bf16 writes each of its chunk's.
    unsafe {
        written_vec(n, |out: &mut [MaybeUninit<half::bf16>]| {
            out.par_chunks_mut(chunk).enumerate().for_each_init(
                || Vec::<f32>::with_capacity(chunk),
                |buffer, (i, out)| {
                    let values = &mut buffer.spare_capacity_mut()[..out.len()];
                    compute(i * chunk, values);
                    // SAFETY: the caller's promise: `compute` wrote the whole chunk; half::bf16
                    // is a transparent u16.
                    let values = &*(values as *const [MaybeUninit<f32>] as *const [f32]);
                    let bits =
                        &mut *(out as *mut [MaybeUninit<half::bf16>] as *mut [MaybeUninit<u16>]);
                    round_to_bf16(values, bits);
                },
            )
        })
    }
}

multiversioned! {
    /// out[j] += Σ_r src[r·cols + lo + j] for r = 0, 1, … in order: a block of column sums of a
    /// row-major matrix, vectorized across the columns (each column's additions keep their order).
    fn add_rows_into<T: Float>(src: &[T], cols: usize, lo: usize, out: &mut [T]) {
        let width = out.len();
        for row in src.chunks_exact(cols) {
            for (o, &x) in out.iter_mut().zip(&row[lo..lo + width]) {
                *o = *o + x;
            }
        }
    }
}

/// The column sums of a row-major matrix with `cols` columns (src.len() / cols rows), each
/// column's rows added in order in T, as candle's `sum(0)` adds them (so the result is the same,
/// bit for bit), split over rayon's threads by blocks of columns. candle's own loop is compiled
/// for baseline x86-64 (4 lanes), which makes it a visible share of a bf16 step as the linear
/// layers' bias gradients (docs/performance.md).
pub(crate) fn column_sums<T: Float + Send + Sync>(src: &[T], cols: usize) -> Vec<T> {
    use rayon::prelude::*;
    // Columns per task: two cache lines of f32 in every row.
    const BLOCK: usize = 32;
    // Below this many elements the pool's dispatch costs more than it saves.
    const PARALLEL_MIN: usize = 1 << 16;
    let mut out = vec![T::zero(); cols];
    if cols == 0 {
        return out;
    }
    if src.len() < PARALLEL_MIN {
        add_rows_into(src, cols, 0, &mut out);
    } else {
        out.par_chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(i, o)| add_rows_into(src, cols, i * BLOCK, o));
    }
    out
}

/// Column sums of an f32 matrix and the matrix rounded to bf16 ([`round_to_bf16`]), in one pass:
/// a linear layer's bias gradient and the bf16 output gradient of its products, which otherwise
/// read the gradient from memory once each.
///
/// Each task rounds and sums a block of rows while they are in cache; the blocks' sums are then
/// added in order. The result does not depend on the thread count, but it is not [`column_sums`]'
/// row-by-row order: the two differ at rounding level.
pub(crate) fn column_sums_and_bf16(src: &[f32], cols: usize) -> (Vec<f32>, Vec<u16>) {
    use rayon::prelude::*;
    // Rows per task: few enough partial sums to add afterwards, enough tasks to share.
    const ROWS: usize = 64;
    if cols == 0 {
        return (Vec::new(), Vec::new());
    }
    let block = ROWS * cols;
    let mut partials = vec![0f32; src.len().div_ceil(block) * cols];
    // SAFETY: the blocks cover every row, and round_to_bf16 writes each row's elements.
    let rounded = unsafe {
        written_vec(src.len(), |rounded| {
            rounded
                .par_chunks_mut(block)
                .zip(src.par_chunks(block))
                .zip(partials.par_chunks_mut(cols))
                .for_each(|((rounded, src), sums)| {
                    // Row by row, so that the sums read each row from L1 after the rounding.
                    for (out, row) in rounded.chunks_mut(cols).zip(src.chunks(cols)) {
                        round_to_bf16(row, out);
                        add_rows_into(row, cols, 0, sums);
                    }
                })
        })
    };
    let mut sums = vec![0f32; cols];
    for partial in partials.chunks(cols) {
        for (s, &p) in sums.iter_mut().zip(partial) {
            *s += p;
        }
    }
    (sums, rounded)
}

/// A new vector of `n` elements, each written by `write`, without clearing the memory first.
/// A cleared buffer (`vec![0; n]`, which is calloc) costs a memset that the writes then repeat:
/// 2-3% of a CPU training step, summed over the ops' outputs.
///
/// # Safety
/// `write` initialises every one of the `n` elements (or the caller drops the vector unread).
pub(crate) unsafe fn written_vec<T>(n: usize, write: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    write(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: the caller's promise.
    unsafe { v.set_len(n) };
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_half_on_every_kind_of_value() {
        // Ties to even both ways, carries into the exponent, the largest finite values (which
        // round to infinity), subnormals, zeros, infinities and NaNs with low payloads only.
        let mut bits: Vec<u32> = vec![
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_7fff,
            0x3f80_8001,
            0x3fff_ffff,
            0x7f7f_ffff,
            0xff7f_ffff,
            0x0000_0001,
            0x8000_8000,
            0x0000_0000,
            0x8000_0000,
            0x7f80_0000,
            0xff80_0000,
            0x7f80_0001,
            0xff80_0001,
            0x7fc0_0000,
        ];
        let mut state = 0x9e37_79b9u32;
        bits.extend((0..100_000).map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        }));
        let values: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let mut ours = vec![std::mem::MaybeUninit::new(0u16); values.len()];
        round_to_bf16(&values, &mut ours);
        for (x, ours) in values.iter().zip(&ours) {
            // SAFETY: round_to_bf16 wrote it (and it was initialised before).
            let ours = unsafe { ours.assume_init() };
            let reference = half::bf16::from_f32(*x);
            if x.is_nan() {
                assert!(half::bf16::from_bits(ours).is_nan(), "{x:?} → {ours:#06x}");
                assert_eq!(ours >> 15, reference.to_bits() >> 15, "NaN sign of {x:?}");
            } else {
                assert_eq!(ours, reference.to_bits(), "{x:e} ({:#010x})", x.to_bits());
            }
        }
        assert_eq!(to_bf16_parallel(&values[..1000]).len(), 1000);
    }

    /// A xorshift stream of values of mixed sign and magnitude (so that the order of additions
    /// shows in a sum), and with `ties`, every fifth one halfway between two bf16 values.
    fn mixed_values(seed: u32, ties: bool) -> impl FnMut() -> f32 {
        let mut state = seed;
        move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let x = (state % 2001) as f32 * 10f32.powi((state % 7) as i32 - 3) - 1.0;
            if ties && state.is_multiple_of(5) {
                f32::from_bits((x.to_bits() & 0xffff_0000) | 0x8000)
            } else {
                x
            }
        }
    }

    #[test]
    fn column_sums_add_each_column_in_row_order_as_candle_does() {
        use candle_core::{Device, Tensor};
        let mut next = mixed_values(0x2545_f491, false);
        // Serial and parallel sizes; column counts that are and are not whole blocks.
        for (rows, cols) in [
            (3, 5),
            (7, 33),
            (2048, 384),
            (700, 130),
            (1, 1000),
            (5000, 17),
        ] {
            let src: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
            let mut reference = vec![0f32; cols];
            for r in 0..rows {
                for (j, sum) in reference.iter_mut().enumerate() {
                    *sum += src[r * cols + j];
                }
            }
            let ours = column_sums(&src, cols);
            assert_eq!(ours, reference, "{rows}×{cols}");
            let candle = Tensor::from_slice(&src, (rows, cols), &Device::Cpu)
                .unwrap()
                .sum(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(ours, candle, "{rows}×{cols} against candle's sum(0)");
        }
        assert!(column_sums::<f32>(&[], 0).is_empty());
    }

    #[test]
    fn column_sums_and_bf16_round_every_value_and_sum_within_f32_rounding() {
        let mut next = mixed_values(0x9e37_79b9, true);
        // One block of rows and several, whole and partial; narrow and wide.
        for (rows, cols) in [
            (1, 7),
            (64, 33),
            (65, 384),
            (2048, 384),
            (300, 1536),
            (5, 1),
        ] {
            let src: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
            let (sums, rounded) = column_sums_and_bf16(&src, cols);
            let each: Vec<u16> = src
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_bits())
                .collect();
            assert_eq!(rounded, each, "{rows}×{cols}: rounding");
            assert_eq!(sums.len(), cols);
            // Any order of f32 additions lands within rows·eps·Σ|x| of the exact (f64) sum.
            for (j, &sum) in sums.iter().enumerate() {
                let column = (0..rows).map(|r| src[r * cols + j] as f64);
                let (exact, size) = column.fold((0.0, 0.0), |(s, m), x| (s + x, m + x.abs()));
                let bound = rows as f64 * f32::EPSILON as f64 * size;
                let err = (sum as f64 - exact).abs();
                assert!(
                    err <= bound,
                    "{rows}×{cols}, column {j}: off by {err} > {bound}"
                );
            }
        }
        assert_eq!(column_sums_and_bf16(&[], 0), (vec![], vec![]));
    }
}
