// Throwaway probe: times candle ops at GPT-2 124M shapes on CUDA.
use candle_core::{DType, Device, Tensor, D};
use std::time::Instant;

fn time<F: FnMut() -> candle_core::Result<Tensor>>(dev: &Device, label: &str, mut f: F) {
    for _ in 0..2 {
        let _ = f().unwrap();
    }
    dev.synchronize().unwrap();
    let t = Instant::now();
    let n = 5;
    for _ in 0..n {
        let _ = f().unwrap();
    }
    dev.synchronize().unwrap();
    println!(
        "{label:50} {:8.3} ms",
        t.elapsed().as_secs_f64() * 1e3 / n as f64
    );
}

fn main() -> candle_core::Result<()> {
    let dev = Device::new_cuda(0)?;
    let (b, t, c, h, v) = (8usize, 1024usize, 768usize, 12usize, 50304usize);
    let x = Tensor::randn(0f32, 1., (b * t, c), &dev)?;
    let xb = x.to_dtype(DType::BF16)?;
    let w = Tensor::randn(0f32, 0.02, (3 * c, c), &dev)?;
    let wb = w.to_dtype(DType::BF16)?;
    time(&dev, "matmul f32 x·Wt (8192x768 · 768x2304)", || {
        x.matmul(&w.t()?)
    });
    time(&dev, "matmul bf16 x·Wt", || xb.matmul(&wb.t()?));
    time(&dev, "to_dtype W f32->bf16", || w.to_dtype(DType::BF16));
    let q = Tensor::randn(0f32, 1., (b, h, t, c / h), &dev)?.to_dtype(DType::BF16)?;
    time(&dev, "q·kT bf16 (8,12,1024,64)", || q.matmul(&q.t()?));
    let s = q.matmul(&q.t()?)?.to_dtype(DType::F32)?;
    time(&dev, "scores to f32", || {
        q.matmul(&q.t()?)?.to_dtype(DType::F32)
    });
    let mask = Tensor::zeros((t, t), DType::F32, &dev)?;
    time(&dev, "broadcast_add mask", || s.broadcast_add(&mask));
    time(&dev, "max_keepdim last", || s.max_keepdim(D::Minus1));
    let m = s.max_keepdim(D::Minus1)?;
    time(&dev, "broadcast_sub max", || s.broadcast_sub(&m));
    time(&dev, "exp", || s.exp());
    time(&dev, "sum_keepdim last", || s.sum_keepdim(D::Minus1));
    let z = s.sum_keepdim(D::Minus1)?;
    time(&dev, "broadcast_div", || s.broadcast_div(&z));
    time(&dev, "affine (scale)", || &s * 0.125);
    let qkv = Tensor::randn(0f32, 1., (b, t, 3 * c), &dev)?;
    time(&dev, "narrow+reshape+transpose+contiguous", || {
        qkv.narrow(D::Minus1, c, c)?
            .reshape((b, t, h, c / h))?
            .transpose(1, 2)?
            .contiguous()
    });
    let logits = Tensor::randn(0f32, 1., (b * t, v), &dev)?;
    time(&dev, "logits max_keepdim", || logits.max_keepdim(D::Minus1));
    time(&dev, "logits exp", || logits.exp());
    let tg = Tensor::zeros((b * t, 1), DType::U32, &dev)?;
    time(&dev, "logits gather", || logits.gather(&tg, 1));
    let x3 = Tensor::randn(0f32, 1., (b, t, c), &dev)?;
    time(&dev, "layernorm mean_keepdim", || {
        x3.mean_keepdim(D::Minus1)
    });
    let ids = Tensor::zeros(b * t, DType::U32, &dev)?;
    let wte = Tensor::randn(0f32, 0.02, (v, c), &dev)?;
    time(&dev, "embedding", || wte.embedding(&ids));
    let g = Tensor::randn(0f32, 1., (b * t, c), &dev)?;
    time(&dev, "index_add (embedding bwd)", || {
        wte.zeros_like()?.index_add(&ids, &g, 0)
    });
    time(&dev, "sqr+sum_all (38M)", || wte.sqr()?.sum_all());
    time(&dev, "Tensor::from_vec host->dev batch", || {
        Tensor::from_vec(vec![0u32; b * t], (b, t), &dev)
    });
    Ok(())
}
