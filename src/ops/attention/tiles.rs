//! What the AVX-512 attention kernels share ([`super::bf16`],
//! [`super::avx512`]): register tiles of 16-lane f32 sums over products whose operands
//! the caller lays out in 16-lane panels, and the causal row extents.
//!
//! A product C = A·B runs over row groups of C: each group keeps MR rows × NR panels of 16
//! columns in zmm registers (up to 8 × 4 of the 32) while it walks the reduction, one step at a
//! time: an f32 (FMA) or a pair of bf16 (`vdpbf16ps`) per lane. The left operand is read one
//! element (or pair) at a time and broadcast, the right one 16 lanes at a time, both through
//! strides, so that a row-major matrix, its transpose and a packed panel all serve.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::head::{causal_softmax_row, softmax_grad_row, Dims};
use crate::ops::cpu::SharedPtr;
use crate::ops::simd::written_vec;

/// Lanes of a panel: one zmm of f32 sums.
pub(super) const PANEL: usize = 16;

/// x rounded up to whole panels.
pub(super) fn panel_ceil(x: usize) -> usize {
    x.next_multiple_of(PANEL)
}

/// Row i of a causal T × T matrix (probabilities, dP, dS) holds keys 0..span(i): i + 1 rounded
/// up to a whole panel (its row stride is T rounded up likewise).
pub(super) fn span(i: usize) -> usize {
    panel_ceil(i + 1)
}

/// `rows` rows of x (`cols` wide, row stride `rs`) into panels of 16 rows, the operand layout
/// that puts 16 rows (keys) in a register's lanes: `dst[(g·cols + d)·16 + l] = x[(16g + l)·rs +
/// d]`, zeros for rows ≥ `rows`. For K in the scores and V in dP, whose keys are rows.
///
/// For 4-byte elements (f32, or u32 pairs of bf16), a 16 × 16 block at a time: 16 rows loaded,
/// transposed in registers and stored as 16 panel rows. One element at a time, this was 2% of a
/// `tiny` f32 step (AMD Zen 4). The shuffles move bits, so any 4-byte values come out as they
/// went in.
///
/// # Safety
/// x's rows are readable; dst holds ⌈rows/16⌉·16·cols elements; the CPU has AVX-512F; `T` is 4
/// bytes.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn row_panels<T: Copy>(
    x: *const T,
    rs: usize,
    (rows, cols): (usize, usize),
    dst: *mut T,
) {
    assert_eq!(
        std::mem::size_of::<T>(),
        4,
        "row_panels takes 4-byte elements"
    );
    let (x, dst) = (x.cast::<f32>(), dst.cast::<f32>());
    for g in 0..rows.div_ceil(PANEL) {
        let panel = dst.add(g * cols * PANEL);
        for d0 in (0..cols).step_by(PANEL) {
            let width = (cols - d0).min(PANEL);
            let mask = if width == PANEL {
                u16::MAX
            } else {
                ((1u32 << width) - 1) as u16
            };
            // r[l]: columns d0.. of row 16g + l (zero past x's rows and columns).
            let r: [__m512; PANEL] = std::array::from_fn(|l| {
                let row = g * PANEL + l;
                if row < rows {
                    _mm512_maskz_loadu_ps(mask, x.add(row * rs + d0))
                } else {
                    _mm512_setzero_ps()
                }
            });
            // u[4a + b], 128-bit lane k: column 4k + b of rows 4a..4a + 4.
            let t: [__m512; PANEL] = std::array::from_fn(|i| {
                let (a, b) = (r[i & !1], r[i | 1]);
                if i % 2 == 0 {
                    _mm512_unpacklo_ps(a, b)
                } else {
                    _mm512_unpackhi_ps(a, b)
                }
            });
            let u: [__m512; PANEL] = std::array::from_fn(|i| {
                let (a, b) = (i / 4, i % 4);
                let (first, second) = (
                    _mm512_castps_pd(t[4 * a + (b / 2)]),
                    _mm512_castps_pd(t[4 * a + 2 + (b / 2)]),
                );
                _mm512_castpd_ps(if b % 2 == 0 {
                    _mm512_unpacklo_pd(first, second)
                } else {
                    _mm512_unpackhi_pd(first, second)
                })
            });
            // v[b] / v[4 + b]: columns b and 8 + b / 4 + b and 12 + b of rows 0..8; v[8 + ..]
            // the same of rows 8..16.
            let v: [__m512; PANEL] = std::array::from_fn(|i| {
                let (half, even, b) = (i / 8, (i / 4) % 2 == 0, i % 4);
                let (p, q) = (u[8 * half + b], u[8 * half + 4 + b]);
                if even {
                    _mm512_shuffle_f32x4::<0x88>(p, q)
                } else {
                    _mm512_shuffle_f32x4::<0xdd>(p, q)
                }
            });
            for d in 0..width {
                // Column d: from v[b] and v[8 + b] (d = b or 8 + b), or v[4 + b] and v[12 + b].
                let b = d % 4;
                let first = if d % 8 < 4 { b } else { 4 + b };
                let (p, q) = (v[first], v[8 + first]);
                let column = if d < 8 {
                    _mm512_shuffle_f32x4::<0x88>(p, q)
                } else {
                    _mm512_shuffle_f32x4::<0xdd>(p, q)
                };
                _mm512_storeu_ps(panel.add((d0 + d) * PANEL), column);
            }
        }
    }
}

/// One step of a reduction in 16 lanes: what an operand's element is, how it is broadcast and
/// loaded, and how a step's products are added into the f32 sums.
pub(super) trait Step {
    /// An element of an operand: one f32, or one u32 holding a pair of bf16.
    type Elem: Copy;
    /// 16 of them in a register.
    type Lanes: Copy;
    /// # Safety
    /// The CPU has the step's instructions; x is readable.
    unsafe fn splat(x: *const Self::Elem) -> Self::Lanes;
    /// The first `n` lanes from x (the rest zero), reading no further.
    ///
    /// # Safety
    /// As [`Step::splat`], for n elements.
    unsafe fn load(x: *const Self::Elem, n: usize) -> Self::Lanes;
    /// acc + the lane-wise products of a and b (of the pair's two products, with bf16).
    ///
    /// # Safety
    /// As [`Step::splat`].
    unsafe fn add_products(acc: __m512, a: Self::Lanes, b: Self::Lanes) -> __m512;
}

/// f32 operands, one FMA a step (AVX-512F).
pub(super) struct F32Step;

impl Step for F32Step {
    type Elem = f32;
    type Lanes = __m512;
    #[inline(always)]
    unsafe fn splat(x: *const f32) -> __m512 {
        _mm512_set1_ps(*x)
    }
    #[inline(always)]
    unsafe fn load(x: *const f32, n: usize) -> __m512 {
        if n >= PANEL {
            _mm512_loadu_ps(x)
        } else {
            _mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, x)
        }
    }
    #[inline(always)]
    unsafe fn add_products(acc: __m512, a: __m512, b: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, acc)
    }
}

/// Pairs of bf16 in u32s, two products a step (AVX512-BF16's `vdpbf16ps`).
pub(super) struct Bf16PairStep;

impl Step for Bf16PairStep {
    type Elem = u32;
    type Lanes = __m512i;
    #[inline(always)]
    unsafe fn splat(x: *const u32) -> __m512i {
        _mm512_set1_epi32(*x as i32)
    }
    #[inline(always)]
    unsafe fn load(x: *const u32, n: usize) -> __m512i {
        if n >= PANEL {
            _mm512_loadu_si512(x.cast())
        } else {
            _mm512_maskz_loadu_epi32(((1u32 << n) - 1) as u16, x.cast())
        }
    }
    #[inline(always)]
    unsafe fn add_products(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
        _mm512_dpbf16_ps(
            acc,
            std::mem::transmute::<__m512i, __m512bh>(a),
            std::mem::transmute::<__m512i, __m512bh>(b),
        )
    }
}

/// A left operand: step `p` of row `r` lies at `base + (r / 16)·group + (r % 16)·lane + p·step`.
#[derive(Clone, Copy)]
pub(super) struct Left<E> {
    pub(super) base: *const E,
    pub(super) group: usize,
    pub(super) lane: usize,
    pub(super) step: usize,
}

impl<E> Left<E> {
    /// A row-major matrix with row stride `rs`.
    pub(super) fn rows(base: *const E, rs: usize) -> Self {
        Self {
            base,
            group: PANEL * rs,
            lane: rs,
            step: 1,
        }
    }

    /// The transpose of a row-major matrix with row stride `rs`: row r of the operand is column
    /// r of the matrix.
    pub(super) fn columns(base: *const E, rs: usize) -> Self {
        Self {
            base,
            group: PANEL,
            lane: 1,
            step: rs,
        }
    }

    /// Panels of `steps` steps each, rows being the panels' lanes (`[group][step][lane]`).
    pub(super) fn panels(base: *const E, steps: usize) -> Self {
        Self {
            base,
            group: PANEL * steps,
            lane: 1,
            step: PANEL,
        }
    }

    /// # Safety
    /// (r, p) lies inside the operand.
    #[inline(always)]
    unsafe fn at(&self, r: usize, p: usize) -> *const E {
        self.base
            .add((r / PANEL) * self.group + (r % PANEL) * self.lane + p * self.step)
    }
}

/// A right operand: the 16 lanes of panel `v` (columns 16v..16v + 16) at step `p` start at
/// `base + v·group + p·step`.
#[derive(Clone, Copy)]
pub(super) struct Right<E> {
    pub(super) base: *const E,
    pub(super) group: usize,
    pub(super) step: usize,
}

impl<E> Right<E> {
    /// A row-major matrix with row stride `rs` (steps are its rows).
    pub(super) fn rows(base: *const E, rs: usize) -> Self {
        Self {
            base,
            group: PANEL,
            step: rs,
        }
    }

    /// Panels of `steps` steps each (`[panel][step][lane]`).
    pub(super) fn panels(base: *const E, steps: usize) -> Self {
        Self {
            base,
            group: PANEL * steps,
            step: PANEL,
        }
    }
}

/// An f32 output: row-major with row stride `rs`.
#[derive(Clone, Copy)]
pub(super) struct Out {
    pub(super) base: *mut f32,
    pub(super) rs: usize,
}

/// C rows `r0..r0+MR`, columns from panel `v0` on (`cols` of them from there, at most NR
/// panels), = Σ over steps `p0..p0+steps` of A(r, p)·B(p, ·). Partial panels of B are read
/// and of C written only as far as `cols` reaches.
///
/// # Safety
/// The CPU has S's instructions; every address read or written lies inside its buffer.
#[inline(always)]
unsafe fn tile<S: Step, const MR: usize, const NR: usize>(
    a: Left<S::Elem>,
    (r0, p0, steps): (usize, usize, usize),
    (b, v0): (Right<S::Elem>, usize),
    (c, cols): (Out, usize),
) {
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let rows: [*const S::Elem; MR] = std::array::from_fn(|r| a.at(r0 + r, p0));
    let lanes: [usize; NR] = std::array::from_fn(|v| cols.saturating_sub(v * PANEL).min(PANEL));
    let b0 = b.base.add(v0 * b.group + p0 * b.step);
    for p in 0..steps {
        let bv: [S::Lanes; NR] =
            std::array::from_fn(|v| S::load(b0.add(v * b.group + p * b.step), lanes[v]));
        for r in 0..MR {
            let av = S::splat(rows[r].add(p * a.step));
            for v in 0..NR {
                acc[r][v] = S::add_products(acc[r][v], av, bv[v]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let row = c.base.add((r0 + r) * c.rs + v0 * PANEL);
        for (v, &sum) in acc.iter().enumerate() {
            if lanes[v] == PANEL {
                _mm512_storeu_ps(row.add(v * PANEL), sum);
            } else if lanes[v] > 0 {
                _mm512_mask_storeu_ps(row.add(v * PANEL), ((1u32 << lanes[v]) - 1) as u16, sum);
            }
        }
    }
}

/// [`tile`] with MR fixed and NR (1 to 4) chosen at run time.
#[inline(always)]
unsafe fn tile_nr<S: Step, const MR: usize>(
    nr: usize,
    a: Left<S::Elem>,
    at: (usize, usize, usize),
    b: (Right<S::Elem>, usize),
    c: (Out, usize),
) {
    match nr {
        1 => tile::<S, MR, 1>(a, at, b, c),
        2 => tile::<S, MR, 2>(a, at, b, c),
        3 => tile::<S, MR, 3>(a, at, b, c),
        _ => tile::<S, MR, 4>(a, at, b, c),
    }
}

/// The rows `0..rows` of C = A·B, in groups of [`height_for`] the widest output; `extent(r,
/// mr)` gives the group at row r (of mr rows) its step range `p0..p1` and its number of output
/// columns. Callers wrap it in a function compiled for S's instructions.
///
/// # Safety
/// As [`tile`].
#[inline(always)]
pub(super) unsafe fn product<S: Step>(
    a: Left<S::Elem>,
    b: Right<S::Elem>,
    c: Out,
    (rows, widest): (usize, usize),
    extent: impl Fn(usize, usize) -> (usize, usize, usize),
) {
    let height = height_for(widest);
    for r in (0..rows).step_by(height) {
        let mr = height.min(rows - r);
        let (p0, p1, cols) = extent(r, mr);
        let panels = cols.div_ceil(PANEL);
        for v0 in (0..panels).step_by(4) {
            let nr = (panels - v0).min(4);
            let (at, b, c) = ((r, p0, p1 - p0), (b, v0), (c, cols - v0 * PANEL));
            match mr {
                1 => tile_nr::<S, 1>(nr, a, at, b, c),
                2 => tile_nr::<S, 2>(nr, a, at, b, c),
                3 => tile_nr::<S, 3>(nr, a, at, b, c),
                4 => tile_nr::<S, 4>(nr, a, at, b, c),
                5 => tile_nr::<S, 5>(nr, a, at, b, c),
                6 => tile_nr::<S, 6>(nr, a, at, b, c),
                7 => tile_nr::<S, 7>(nr, a, at, b, c),
                _ => tile_nr::<S, 8>(nr, a, at, b, c),
            }
        }
    }
}

/// Row groups of 8 when the output is at most two panels wide (so that a group keeps 16 sums
/// going), else 4. Both divide 16, so a group's rows share a panel of a transposed left
/// operand, and a group starting at row r ends by span(r).
fn height_for(widest: usize) -> usize {
    if widest <= 2 * PANEL {
        8
    } else {
        4
    }
}

/// A tile kernel's forward over every (batch, head) task, in parallel, into a new output y and,
/// with `keep_probabilities`, new kept probabilities (B·H blocks of T rows, row stride
/// [`panel_ceil`]`(T)`), neither cleared first. `head(task, y, kept)` gets y's start and its own
/// block of the kept probabilities (None: it uses its own scratch).
///
/// # Safety
/// `head` writes all T rows of its head's columns of its batch row of y and, given a block, all
/// of that block (padded rows included), and nothing another task writes.
pub(super) unsafe fn forward_by_head(
    d: &Dims,
    keep_probabilities: bool,
    head: impl Fn(usize, *mut f32, Option<*mut f32>) + Sync,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let (y_len, block) = (d.batch * d.t * d.c, d.t * panel_ceil(d.t));
    let tasks = |y: SharedPtr<f32>, kept: Option<SharedPtr<f32>>| {
        (0..d.batch * d.n_head).into_par_iter().for_each(|task| {
            // SAFETY: the task's block lies inside the kept buffer.
            let block = kept.map(|kept| unsafe { kept.get().add(task * block) });
            head(task, y.get(), block)
        })
    };
    let mut kept = None;
    // SAFETY: the caller's promise: the tasks write all of y and of the kept probabilities.
    let y = unsafe {
        written_vec(y_len, |y| {
            let y = SharedPtr(y.as_mut_ptr().cast::<f32>());
            if keep_probabilities {
                kept = Some(written_vec(d.batch * d.n_head * block, |kept| {
                    tasks(y, Some(SharedPtr(kept.as_mut_ptr().cast())))
                }));
            } else {
                tasks(y, None);
            }
        })
    };
    (y, kept)
}

/// A tile kernel's backward over every (batch, head) task, in parallel, into a new dqkv of `len`
/// values, not cleared first: `head(task, dqkv)` gets its start.
///
/// # Safety
/// `head` writes all T rows of its head's dq, dk and dv columns of its batch row, and nothing
/// another task writes.
pub(super) unsafe fn backward_by_head(
    d: &Dims,
    len: usize,
    head: impl Fn(usize, *mut f32) + Sync,
) -> Vec<f32> {
    // SAFETY: the caller's promise: the tasks write all of dqkv.
    unsafe {
        written_vec(len, |dqkv| {
            let dqkv = SharedPtr(dqkv.as_mut_ptr().cast::<f32>());
            (0..d.batch * d.n_head)
                .into_par_iter()
                .for_each(|task| head(task, dqkv.get()))
        })
    }
}

/// The scores of one head (T rows, row stride [`panel_ceil`]`(T)`) into probabilities, in place,
/// whole padded rows: the entries past each row's span are zeroed, so that a kept block is
/// written all through.
///
/// # Safety
/// p holds T such rows.
#[inline(always)]
pub(super) unsafe fn causal_softmax_padded(p: *mut f32, t: usize, scale: f32) {
    let tp = panel_ceil(t);
    for i in 0..t {
        causal_softmax_row(
            std::slice::from_raw_parts_mut(p.add(i * tp), tp),
            i + 1,
            scale,
        );
    }
}

/// dP of one head into dS in place ([`softmax_grad_row`]), over each row's span, with the
/// probabilities p; both T rows of row stride [`panel_ceil`]`(T)`.
///
/// # Safety
/// p and ds hold T such rows.
#[inline(always)]
pub(super) unsafe fn softmax_grad_padded(p: *const f32, ds: *mut f32, t: usize, scale: f32) {
    let tp = panel_ceil(t);
    for i in 0..t {
        softmax_grad_row(
            std::slice::from_raw_parts(p.add(i * tp), span(i)),
            std::slice::from_raw_parts_mut(ds.add(i * tp), span(i)),
            scale,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{row_panels, PANEL};

    #[test]
    fn row_panels_lays_out_each_element_where_the_definition_puts_it() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512F");
            return;
        }
        // (rows, cols, row stride): whole blocks, partial row groups and column blocks, the
        // models' head shapes inside qkv.
        for (rows, cols, rs) in [
            (16usize, 16usize, 16usize),
            (5, 3, 7),
            (37, 20, 25),
            (128, 32, 384),
            (256, 64, 1152),
        ] {
            // Element (i, j) is 1000·i + j + 0.5, distinct and exact in f32.
            let x: Vec<f32> = (0..rows * rs)
                .map(|e| (1000 * (e / rs) + e % rs) as f32 + 0.5)
                .collect();
            let n = rows.div_ceil(PANEL) * PANEL * cols;
            let mut panels = vec![f32::NAN; n];
            // SAFETY: x holds rows × rs elements, panels ⌈rows/16⌉·16·cols; AVX-512F checked.
            unsafe { row_panels(x.as_ptr(), rs, (rows, cols), panels.as_mut_ptr()) };
            for g in 0..rows.div_ceil(PANEL) {
                for d in 0..cols {
                    for l in 0..PANEL {
                        let row = g * PANEL + l;
                        let want = if row < rows {
                            (1000 * row + d) as f32 + 0.5
                        } else {
                            0.0
                        };
                        let at = (g * cols + d) * PANEL + l;
                        assert_eq!(panels[at], want, "({rows}, {cols}) row {row} column {d}");
                    }
                }
            }
        }
    }
}
