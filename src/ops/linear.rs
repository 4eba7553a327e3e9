//! The linear layer `y = x·Wᵀ + b` on CPU through oneDNN, with its backward: `dx = dy·W`,
//! `dW = dyᵀ·x`, `db = Σ_rows dy`, each matmul in the layer's [`Precision`].
//!
//! In bf16 the operands are rounded to bf16 and the products accumulated in f32 (AMX on Intel
//! Xeons, AVX512-BF16 on AMD Zen 4/5), as under PyTorch's CPU autocast; unlike autocast, the
//! output stays f32, so the residual stream, LayerNorm, attention and loss see f32 values, and the
//! gradients reach the f32 master weights in f32.

use super::cpu::{contiguous, matmul_new, Operand};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

pub use super::Precision;

fn f32_input<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => contiguous(v, l, what),
        _ => bail!("fused linear: {what} must be f32"),
    }
}

/// Forward: x (M, K), W (N, K) [, b (N)] → y (M, N). In bf16 it keeps the rounded W, and x when
/// it rounded it (not when x came as bf16), for its backward pass, which then rounds only the
/// output gradient.
struct LinearForward {
    precision: Precision,
    rounded: Mutex<Option<Rounded>>,
}

/// The operands a bf16 forward rounded: x (None when it came rounded) and W.
type Rounded = (Option<Operand<'static>>, Operand<'static>);

impl LinearForward {
    fn run(
        &self,
        (x, lx): (&CpuStorage, &Layout),
        (w, lw): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (n, k_w) = lw.shape().dims2()?;
        if k != k_w {
            bail!("fused linear: x is {k} wide, the weight {k_w}");
        }
        let bias = match bias {
            Some((b, lb)) => {
                let b = f32_input(b, lb, "bias")?;
                if b.len() != n {
                    bail!("fused linear: {n} outputs but {} biases", b.len());
                }
                Some(b)
            }
            None => None,
        };
        let x = Operand::of_storage(x, lx, self.precision, "x")?;
        let w = Operand::new(f32_input(w, lw, "weight")?, self.precision);
        // y = x · Wᵀ: Wᵀ (K×N) is W read with row stride 1 and column stride K.
        let y = matmul_new((m, n, k), x.view(k, 1), w.view(1, k), bias)?;
        if let Some(w) = w.into_owned() {
            *self.rounded.lock().expect("linear stash") = Some((x.into_owned(), w));
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    /// (dx, dW, and with `bias` db).
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        bias: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let grad = LinearGrad {
            precision: self.precision,
            rounded: self.rounded.lock().expect("linear stash").take(),
            bias,
            dw_db: Mutex::new(None),
        };
        let dx = dy.contiguous()?.apply_op3_no_bwd(w, x, &grad)?;
        let (dw, db) = grad
            .dw_db
            .lock()
            .expect("linear dw")
            .take()
            .expect("the gradient op computed dw");
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for LinearForward {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, w, dy, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for LinearForward {
    fn name(&self) -> &'static str {
        "fused-linear-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.backward(x, w, dy, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// The backward of [`LinearForward`] on (dy (M, N), W (N, K), x (M, K)): returns dx = dy·W
/// (M, K) and leaves dW = dyᵀ·x (N, K), and with `bias` db = Σ_rows dy (N), in `dw_db`, so that
/// dy is rounded once for both products.
struct LinearGrad {
    precision: Precision,
    /// x and W as the forward pass rounded them (bf16), when it kept them.
    rounded: Option<Rounded>,
    bias: bool,
    dw_db: Mutex<Option<(Tensor, Option<Tensor>)>>,
}

impl CustomOp3 for LinearGrad {
    fn name(&self) -> &'static str {
        "fused-linear-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, n) = l1.shape().dims2()?;
        let (n_w, k) = l2.shape().dims2()?;
        let (m_x, k_x) = l3.shape().dims2()?;
        if n != n_w || m != m_x || k != k_x {
            bail!("fused linear backward: gradient {m}×{n}, weight {n_w}×{k}, x {m_x}×{k_x}");
        }
        let dy_f32 = f32_input(s1, l1, "output gradient")?;
        // db in f32: with f32 matmuls its rows added in order, as candle sums a broadcast add's
        // gradient; with bf16 ones in the pass that rounds dy, by blocks of rows.
        let (db, dy) = match (self.bias, self.precision) {
            (true, Precision::Bf16) => {
                let (db, dy) = super::simd::column_sums_and_bf16(dy_f32, n);
                (Some(db), Operand::bf16(dy.into()))
            }
            (bias, precision) => (
                bias.then(|| super::simd::column_sums(dy_f32, n)),
                Operand::new(dy_f32, precision),
            ),
        };
        let (computed_x, computed_w);
        let x = match &self.rounded {
            Some((Some(x), _)) => x,
            _ => {
                computed_x = Operand::of_storage(s3, l3, self.precision, "x")?;
                &computed_x
            }
        };
        let w = match &self.rounded {
            Some((_, w)) => w,
            None => {
                computed_w = Operand::new(f32_input(s2, l2, "weight")?, self.precision);
                &computed_w
            }
        };
        // dx = dy · W
        let dx = matmul_new((m, k, n), dy.view(n, 1), w.view(k, 1), None)?;
        // dW = dyᵀ · x, dyᵀ (N×M) being dy read with row stride 1 and column stride N.
        let dw = matmul_new((n, k, m), dy.view(1, n), x.view(k, 1), None)?;
        let cpu = candle_core::Device::Cpu;
        let db = db.map(|db| Tensor::from_vec(db, n, &cpu)).transpose()?;
        *self.dw_db.lock().expect("linear dw") = Some((Tensor::from_vec(dw, (n, k), &cpu)?, db));
        Ok((CpuStorage::F32(dx), Shape::from((m, k))))
    }
}

/// `x·Wᵀ + b` for x (M, K), W (N, K) stored `[out, in]`, b (N), all f32 on CPU, through oneDNN
/// (see the module docs); the result (M, N) is f32. Backward works through it.
pub fn fused_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    precision: Precision,
) -> Result<Tensor> {
    let op = LinearForward {
        precision,
        rounded: Mutex::new(None),
    };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op),
        None => x.apply_op2(&w, op),
    }
}

/// `x·Wᵀ + b` for x (M, K), W (N, K) stored `[out, in]`, b (N): [`fused_linear`] where it
/// applies, its operands in `precision`; else candle's matmul with x, W and b cast to `cast`
/// (differentiably, so gradients reach the master weights in their own dtype) and the result
/// left in it, as under PyTorch's autocast.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    precision: Precision,
    cast: DType,
) -> Result<Tensor> {
    if fused_linear_applies(x, w) {
        return fused_linear(x, w, bias, precision);
    }
    let y = x.to_dtype(cast)?.matmul(&w.to_dtype(cast)?.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(cast)?),
        None => Ok(y),
    }
}

/// Whether [`fused_linear`] serves these tensors: f32 on CPU, with oneDNN loaded (without it,
/// candle's own matmul, the same gemm, serves f32). x may also be bf16, stored so by the op
/// that produced it for a layer that [`fused_linear_takes_bf16`].
pub fn fused_linear_applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && fused_linear_weight_applies(w)
}

fn fused_linear_weight_applies(w: &Tensor) -> bool {
    w.device().is_cpu() && w.dtype() == DType::F32 && super::onednn::onednn().is_some()
}

/// Whether [`fused_linear`] with this weight and precision rounds its input to bf16 before
/// anything else reads it: then the op that produces the input may store it in bf16 already
/// rounded (`fused_layer_norm_rounded`, `fused_gelu_tanh_rounded`), which leaves the values as
/// they were and saves writing the f32 output and reading it back to round it.
pub fn fused_linear_takes_bf16(w: &Tensor, precision: Precision) -> bool {
    precision == Precision::Bf16 && fused_linear_weight_applies(w)
}
