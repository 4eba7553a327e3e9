//! CPU matmuls through oneDNN (<https://github.com/oneapi-src/oneDNN>), PyTorch's own CPU backend,
//! loaded at run time from `libdnnl.so.2` (oneDNN 2.x, Debian's `libdnnl2`).
//!
//! Why oneDNN: its brgemm kernels use AMX on Intel Xeons (bf16 × bf16 → f32 at 3-5x the f32
//! rate) and AVX512-BF16 on AMD Zen 4/5, and its f32 AVX-512 kernels beat gemm's on the model's
//! shapes on the hosts measured (docs/performance.md). Why at run time: the build and the tests
//! must work where the library is missing; every caller then falls back to gemm
//! (`cpu::strided_matmul`). `GPT_PRETRAIN_ONEDNN=0` switches it off (to compare, or to
//! get gemm's results bitwise).
//!
//! Only the C API of oneDNN 2.x is used (`dnnl_matmul_desc_init` and friends); 3.x removed it, so
//! the library is looked up by its 2.x soname. No Rust crate wraps oneDNN with upkeep (crates.io
//! has 0.0.1 placeholders), so the dozen functions are declared here.

use candle_core::{bail, Result};
use libloading::Library;
use std::cell::RefCell;
use std::collections::hash_map::{Entry, HashMap};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock};

type Status = c_int;
type Handle = *mut c_void;

/// `dnnl_data_type_t` values (dnnl_types.h).
const DNNL_BF16: c_int = 2;
const DNNL_F32: c_int = 3;
const DNNL_CPU: c_int = 1;
const DNNL_STREAM_IN_ORDER: c_int = 1;
const DNNL_QUERY_IMPL_INFO_STR: c_int = 8;
const DNNL_ARG_SRC: c_int = 1;
const DNNL_ARG_DST: c_int = 17;
const DNNL_ARG_WEIGHTS: c_int = 33;
const DNNL_ARG_BIAS: c_int = 41;
const DNNL_ARG_SCRATCHPAD: c_int = 80;
const DNNL_SCRATCHPAD_MODE_USER: c_int = 1;
const DNNL_QUERY_SCRATCHPAD_MD: c_int = 136;

/// `dnnl_memory_desc_t` is 696 bytes and `dnnl_matmul_desc_t` 2,800 in oneDNN 2.6 (x86-64);
/// oneDNN only writes into them through the pointers we pass, so over-sized aligned buffers do.
#[repr(C, align(64))]
struct MemoryDesc([u8; 1024]);
const MEMORY_DESC_BYTES: usize = 696;
#[repr(C, align(64))]
struct MatmulDesc([u8; 4096]);

#[repr(C)]
struct ExecArg {
    arg: c_int,
    memory: Handle,
}

/// The element type of a matmul operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    F32,
    /// bf16 as its 16 bits (the upper half of an f32).
    Bf16,
}

impl Elem {
    fn dnnl(self) -> c_int {
        match self {
            Elem::F32 => DNNL_F32,
            Elem::Bf16 => DNNL_BF16,
        }
    }
}

/// A strided matrix operand: (pointer, element type, row stride, column stride), strides in
/// elements.
pub type Operand = (*const c_void, Elem, isize, isize);

struct Api {
    memory_desc_init_by_strides:
        unsafe extern "C" fn(*mut MemoryDesc, c_int, *const i64, c_int, *const i64) -> Status,
    matmul_desc_init: unsafe extern "C" fn(
        *mut MatmulDesc,
        *const MemoryDesc,
        *const MemoryDesc,
        *const MemoryDesc,
        *const MemoryDesc,
    ) -> Status,
    primitive_attr_create: unsafe extern "C" fn(*mut Handle) -> Status,
    primitive_attr_destroy: unsafe extern "C" fn(Handle) -> Status,
    primitive_attr_set_post_ops: unsafe extern "C" fn(Handle, Handle) -> Status,
    primitive_attr_set_scratchpad_mode: unsafe extern "C" fn(Handle, c_int) -> Status,
    primitive_desc_query_md: unsafe extern "C" fn(Handle, c_int, c_int) -> *const MemoryDesc,
    memory_desc_get_size: unsafe extern "C" fn(*const MemoryDesc) -> usize,
    post_ops_create: unsafe extern "C" fn(*mut Handle) -> Status,
    post_ops_destroy: unsafe extern "C" fn(Handle) -> Status,
    post_ops_append_sum: unsafe extern "C" fn(Handle, f32) -> Status,
    primitive_desc_create:
        unsafe extern "C" fn(*mut Handle, *const c_void, Handle, Handle, Handle) -> Status,
    primitive_desc_query: unsafe extern "C" fn(Handle, c_int, c_int, *mut c_void) -> Status,
    primitive_desc_destroy: unsafe extern "C" fn(Handle) -> Status,
    primitive_create: unsafe extern "C" fn(*mut Handle, Handle) -> Status,
    primitive_execute: unsafe extern "C" fn(Handle, Handle, c_int, *const ExecArg) -> Status,
    memory_create: unsafe extern "C" fn(*mut Handle, *const MemoryDesc, Handle, Handle) -> Status,
    memory_destroy: unsafe extern "C" fn(Handle) -> Status,
    memory_set_data_handle: unsafe extern "C" fn(Handle, Handle) -> Status,
    engine_create: unsafe extern "C" fn(*mut Handle, c_int, usize) -> Status,
    stream_create: unsafe extern "C" fn(*mut Handle, Handle, c_int) -> Status,
    stream_wait: unsafe extern "C" fn(Handle) -> Status,
    /// libgomp's, which libdnnl links: oneDNN runs on OpenMP threads, as many as this says.
    omp_set_num_threads: unsafe extern "C" fn(c_int),
}

/// One matmul's shape, layouts and options: a compiled primitive serves every call with the same
/// key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    mnk: (usize, usize, usize),
    a: (Elem, isize, isize),
    b: (Elem, isize, isize),
    bias: bool,
    accumulate: bool,
    /// dst's row stride (elements).
    dst_row_stride: isize,
}

/// A compiled matmul. Its scratchpad is ours to pass (oneDNN's own is shared between the threads
/// that run a primitive at once unless the library was built for concurrent execution).
struct Primitive {
    primitive: Handle,
    /// src, weights, dst, bias, scratchpad.
    descs: Box<[MemoryDesc; 5]>,
    scratchpad_bytes: usize,
    has_bias: bool,
    implementation: String,
}

// A primitive may be executed from several threads at once (oneDNN's documented contract), each
// with its own stream and scratchpad.
unsafe impl Send for Primitive {}
unsafe impl Sync for Primitive {}

/// The loaded library: an engine and the primitives compiled so far. Each thread that runs a
/// matmul gets its own stream.
pub struct OneDnn {
    api: Api,
    engine: Handle,
    primitives: Mutex<HashMap<Key, Arc<Primitive>>>,
    version: String,
    _library: Library,
}

// The engine is thread-safe; the primitive cache is behind its lock.
unsafe impl Send for OneDnn {}
unsafe impl Sync for OneDnn {}

thread_local! {
    /// This thread's oneDNN stream (null until its first matmul).
    static STREAM: std::cell::Cell<Handle> = const { std::cell::Cell::new(std::ptr::null_mut()) };
    /// This thread's memory objects for each primitive it has run, so that a call only points
    /// them at its buffers instead of creating and destroying five objects and a scratchpad
    /// (which mattered for small matmuls: per-head attention products ran 10% slower that way).
    static BOUND: RefCell<HashMap<Key, Bound>> = RefCell::new(HashMap::new());
    /// This thread's scratchpad, as large as the largest any of its primitives asked for.
    static SCRATCHPAD: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A primitive with this thread's memory objects for its arguments (src, weights, dst, bias,
/// scratchpad; null where the primitive has none).
struct Bound {
    primitive: Arc<Primitive>,
    memories: [Handle; 5],
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Some(dnnl) = onednn() {
            for memory in self.memories.into_iter().filter(|m| !m.is_null()) {
                // SAFETY: each was created by memory_create and is destroyed once, here.
                unsafe { (dnnl.api.memory_destroy)(memory) };
            }
        }
    }
}

fn check(status: Status, what: &str) -> Result<()> {
    if status != 0 {
        bail!("oneDNN: {what} failed with status {status}");
    }
    Ok(())
}

/// oneDNN, when `libdnnl.so.2` loads and `GPT_PRETRAIN_ONEDNN` is not `0`; `None` otherwise (the
/// callers then use gemm). Loaded once per process.
pub fn onednn() -> Option<&'static OneDnn> {
    static LOADED: OnceLock<Option<OneDnn>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            if std::env::var("GPT_PRETRAIN_ONEDNN").is_ok_and(|v| v == "0") {
                return None;
            }
            // SAFETY: loading runs the library's initialisers (oneDNN's and libgomp's), which
            // have no preconditions.
            unsafe { OneDnn::load() }.ok()
        })
        .as_ref()
}

/// Why this process cannot run bf16 matmuls on CPU, or `None` when it can: oneDNN must load (the
/// fused bf16 paths are built on it; [`bf16_kernels`] says whether they run at bf16's speed).
pub fn bf16_matmuls_unavailable() -> Option<String> {
    match onednn() {
        None => Some(format!("the CPU matmuls run on {}", backend_description())),
        Some(_) => None,
    }
}

/// Whether oneDNN has a bf16 matmul kernel for this CPU (oneDNN 2.x has none without AVX-512):
/// without one, bf16 operands are widened to f32 (exact) and multiplied by the f32 matmuls.
pub fn bf16_kernels() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        onednn().is_some_and(|dnnl| dnnl.implementation((16, 16, 16), Elem::Bf16).is_ok())
    })
}

/// A line for logs: which CPU matmul backend runs, and why.
pub fn backend_description() -> String {
    match onednn() {
        Some(dnnl) => format!("oneDNN {}", dnnl.version),
        None if std::env::var("GPT_PRETRAIN_ONEDNN").is_ok_and(|v| v == "0") => {
            "gemm (oneDNN switched off by GPT_PRETRAIN_ONEDNN=0)".into()
        }
        None => "gemm (libdnnl.so.2 not found: install libdnnl2 for oneDNN's kernels)".into(),
    }
}

impl OneDnn {
    unsafe fn load() -> std::result::Result<Self, Box<dyn std::error::Error>> {
        let library = Library::new("libdnnl.so.2")?;
        macro_rules! sym {
            ($name:literal) => {
                *library.get(concat!($name, "\0").as_bytes())?
            };
        }
        let api = Api {
            memory_desc_init_by_strides: sym!("dnnl_memory_desc_init_by_strides"),
            matmul_desc_init: sym!("dnnl_matmul_desc_init"),
            primitive_attr_create: sym!("dnnl_primitive_attr_create"),
            primitive_attr_destroy: sym!("dnnl_primitive_attr_destroy"),
            primitive_attr_set_post_ops: sym!("dnnl_primitive_attr_set_post_ops"),
            primitive_attr_set_scratchpad_mode: sym!("dnnl_primitive_attr_set_scratchpad_mode"),
            primitive_desc_query_md: sym!("dnnl_primitive_desc_query_md"),
            memory_desc_get_size: sym!("dnnl_memory_desc_get_size"),
            post_ops_create: sym!("dnnl_post_ops_create"),
            post_ops_destroy: sym!("dnnl_post_ops_destroy"),
            post_ops_append_sum: sym!("dnnl_post_ops_append_sum"),
            primitive_desc_create: sym!("dnnl_primitive_desc_create"),
            primitive_desc_query: sym!("dnnl_primitive_desc_query"),
            primitive_desc_destroy: sym!("dnnl_primitive_desc_destroy"),
            primitive_create: sym!("dnnl_primitive_create"),
            primitive_execute: sym!("dnnl_primitive_execute"),
            memory_create: sym!("dnnl_memory_create"),
            memory_destroy: sym!("dnnl_memory_destroy"),
            memory_set_data_handle: sym!("dnnl_memory_set_data_handle"),
            engine_create: sym!("dnnl_engine_create"),
            stream_create: sym!("dnnl_stream_create"),
            stream_wait: sym!("dnnl_stream_wait"),
            omp_set_num_threads: sym!("omp_set_num_threads"),
        };
        #[repr(C)]
        struct Version {
            major: c_int,
            minor: c_int,
            patch: c_int,
            hash: *const c_char,
            cpu_runtime: u32,
            gpu_runtime: u32,
        }
        let version: unsafe extern "C" fn() -> *const Version = sym!("dnnl_version");
        let v = &*version();
        let version = format!("{}.{}.{}", v.major, v.minor, v.patch);
        let mut engine = std::ptr::null_mut();
        check(
            (api.engine_create)(&mut engine, DNNL_CPU, 0),
            "engine_create",
        )?;
        Ok(Self {
            api,
            engine,
            primitives: Mutex::new(HashMap::new()),
            version,
            _library: library,
        })
    }

    /// The oneDNN version, `major.minor.patch`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The implementation oneDNN chose for a matmul of this shape and these operand types (for
    /// example `brg:avx512_core_amx_bf16`), compiling it if needed.
    pub fn implementation(&self, mnk: (usize, usize, usize), elem: Elem) -> Result<String> {
        let (_, n, k) = mnk;
        let key = Key {
            mnk,
            a: (elem, k as isize, 1),
            b: (elem, n as isize, 1),
            bias: false,
            accumulate: false,
            dst_row_stride: n as isize,
        };
        // SAFETY: compiling a primitive reads only the descriptors built here.
        Ok(unsafe { self.primitive(key)? }.implementation.clone())
    }

    /// dst (m×n, f32, rows `dst.1` ≥ n elements apart: a whole row-major matrix, or a block of
    /// columns of a wider one) = a (m×k) · b (k×n) [+ bias (n, f32) on every row], or dst += …
    /// with `accumulate`; `a` and `b` are strided, in f32 or bf16 (both the same), and the
    /// products are accumulated in f32. Runs on `threads` OpenMP threads; callers that split the
    /// work over rayon's threads themselves pass 1 (one thread pool, not two competing).
    ///
    /// # Safety
    /// Every operand must cover its whole matrix, `dst` must hold m rows of n writable f32 (its
    /// stride apart) that no input overlaps, and `bias`, when given, n f32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul(
        &self,
        mnk: (usize, usize, usize),
        (dst, dst_row_stride): (*mut f32, usize),
        a: Operand,
        b: Operand,
        bias: Option<*const f32>,
        accumulate: bool,
        threads: usize,
    ) -> Result<()> {
        if dst_row_stride < mnk.1 {
            bail!(
                "oneDNN matmul: dst rows overlap (row stride {dst_row_stride} < {} columns)",
                mnk.1
            );
        }
        if a.1 != b.1 {
            bail!("oneDNN matmul: both operands must have the same element type");
        }
        let key = Key {
            mnk,
            a: (a.1, a.2, a.3),
            b: (b.1, b.2, b.3),
            bias: bias.is_some(),
            accumulate,
            dst_row_stride: dst_row_stride as isize,
        };
        let stream = self.stream()?;
        BOUND.with_borrow_mut(|bound| {
            let bound = match bound.entry(key) {
                Entry::Occupied(found) => found.into_mut(),
                Entry::Vacant(slot) => slot.insert(self.bind(self.primitive(key)?)?),
            };
            let scratchpad_bytes = bound.primitive.scratchpad_bytes;
            SCRATCHPAD.with_borrow_mut(|scratchpad| {
                if scratchpad.len() < scratchpad_bytes + 64 {
                    // Only oneDNN reads it, after writing it: zeroing once is the cheap way to
                    // a buffer of this length.
                    scratchpad.resize(scratchpad_bytes + 64, 0);
                }
                let at = scratchpad.as_mut_ptr();
                let at = at.add(at.align_offset(64));
                let buffers = [
                    (DNNL_ARG_SRC, a.0 as Handle),
                    (DNNL_ARG_WEIGHTS, b.0 as Handle),
                    (DNNL_ARG_DST, dst as Handle),
                    (DNNL_ARG_BIAS, bias.unwrap_or(std::ptr::null()) as Handle),
                    (DNNL_ARG_SCRATCHPAD, at as Handle),
                ];
                let mut args = [const {
                    ExecArg {
                        arg: 0,
                        memory: std::ptr::null_mut(),
                    }
                }; 5];
                let mut used = 0;
                for (&memory, (arg, data)) in bound.memories.iter().zip(buffers) {
                    if memory.is_null() {
                        continue;
                    }
                    check(
                        (self.api.memory_set_data_handle)(memory, data),
                        "memory_set_data_handle",
                    )?;
                    args[used] = ExecArg { arg, memory };
                    used += 1;
                }
                (self.api.omp_set_num_threads)(threads.max(1) as c_int);
                check(
                    (self.api.primitive_execute)(
                        bound.primitive.primitive,
                        stream,
                        used as c_int,
                        args.as_ptr(),
                    ),
                    "primitive_execute",
                )?;
                check((self.api.stream_wait)(stream), "stream_wait")
            })
        })
    }

    /// Memory objects for `primitive`'s arguments, without buffers yet.
    unsafe fn bind(&self, primitive: Arc<Primitive>) -> Result<Bound> {
        let mut bound = Bound {
            memories: [std::ptr::null_mut(); 5],
            primitive,
        };
        // Descriptor slots: src, weights, dst, bias, scratchpad.
        let wanted = [true, true, true, bound.primitive.has_bias, true];
        for (slot, memory) in bound.memories.iter_mut().enumerate() {
            if wanted[slot] {
                check(
                    (self.api.memory_create)(
                        memory,
                        &bound.primitive.descs[slot],
                        self.engine,
                        std::ptr::null_mut(),
                    ),
                    "memory_create",
                )?;
            }
        }
        Ok(bound)
    }

    /// This thread's stream, created on first use.
    unsafe fn stream(&self) -> Result<Handle> {
        let mut stream = STREAM.get();
        if stream.is_null() {
            check(
                (self.api.stream_create)(&mut stream, self.engine, DNNL_STREAM_IN_ORDER),
                "stream_create",
            )?;
            STREAM.set(stream);
        }
        Ok(stream)
    }

    /// The primitive for `key`, compiled on first use (primitives live as long as the process).
    unsafe fn primitive(&self, key: Key) -> Result<Arc<Primitive>> {
        if let Some(found) = self.primitives.lock().unwrap().get(&key) {
            return Ok(found.clone());
        }
        let compiled = Arc::new(self.compile(key)?);
        Ok(self
            .primitives
            .lock()
            .unwrap()
            .entry(key)
            .or_insert(compiled)
            .clone())
    }

    unsafe fn compile(&self, key: Key) -> Result<Primitive> {
        let (api, engine) = (&self.api, self.engine);
        let (m, n, k) = key.mnk;
        let (m, n, k) = (m as i64, n as i64, k as i64);
        let mut descs = Box::new([
            MemoryDesc([0; 1024]),
            MemoryDesc([0; 1024]),
            MemoryDesc([0; 1024]),
            MemoryDesc([0; 1024]),
            MemoryDesc([0; 1024]),
        ]);
        let init = |desc: &mut MemoryDesc, dims: [i64; 2], elem: Elem, strides: [i64; 2]| {
            check(
                (api.memory_desc_init_by_strides)(
                    desc,
                    2,
                    dims.as_ptr(),
                    elem.dnnl(),
                    strides.as_ptr(),
                ),
                "memory_desc_init_by_strides",
            )
        };
        init(
            &mut descs[0],
            [m, k],
            key.a.0,
            [key.a.1 as i64, key.a.2 as i64],
        )?;
        init(
            &mut descs[1],
            [k, n],
            key.b.0,
            [key.b.1 as i64, key.b.2 as i64],
        )?;
        init(
            &mut descs[2],
            [m, n],
            Elem::F32,
            [key.dst_row_stride as i64, 1],
        )?;
        init(&mut descs[3], [1, n], Elem::F32, [n, 1])?;
        let mut op = MatmulDesc([0; 4096]);
        let bias_desc: *const MemoryDesc = if key.bias {
            &descs[3]
        } else {
            std::ptr::null()
        };
        check(
            (api.matmul_desc_init)(&mut op, &descs[0], &descs[1], bias_desc, &descs[2]),
            "matmul_desc_init",
        )?;
        let (mut attr, mut post_ops) = (std::ptr::null_mut(), std::ptr::null_mut());
        check(
            (api.primitive_attr_create)(&mut attr),
            "primitive_attr_create",
        )?;
        check(
            (api.primitive_attr_set_scratchpad_mode)(attr, DNNL_SCRATCHPAD_MODE_USER),
            "primitive_attr_set_scratchpad_mode",
        )?;
        if key.accumulate {
            check((api.post_ops_create)(&mut post_ops), "post_ops_create")?;
            check(
                (api.post_ops_append_sum)(post_ops, 1.0),
                "post_ops_append_sum",
            )?;
            check(
                (api.primitive_attr_set_post_ops)(attr, post_ops),
                "primitive_attr_set_post_ops",
            )?;
        }
        let mut desc = std::ptr::null_mut();
        let created = check(
            (api.primitive_desc_create)(
                &mut desc,
                &op as *const MatmulDesc as *const c_void,
                attr,
                engine,
                std::ptr::null_mut(),
            ),
            "primitive_desc_create (no implementation for this matmul)",
        );
        if !post_ops.is_null() {
            (api.post_ops_destroy)(post_ops);
        }
        (api.primitive_attr_destroy)(attr);
        created?;
        let mut name: *const c_char = std::ptr::null();
        let implementation = if (api.primitive_desc_query)(
            desc,
            DNNL_QUERY_IMPL_INFO_STR,
            0,
            &mut name as *mut *const c_char as *mut c_void,
        ) == 0
            && !name.is_null()
        {
            CStr::from_ptr(name).to_string_lossy().into_owned()
        } else {
            "unknown".into()
        };
        let scratchpad = (api.primitive_desc_query_md)(desc, DNNL_QUERY_SCRATCHPAD_MD, 0);
        let scratchpad_bytes = if scratchpad.is_null() {
            0
        } else {
            std::ptr::copy_nonoverlapping(
                scratchpad.cast::<u8>(),
                descs[4].0.as_mut_ptr(),
                MEMORY_DESC_BYTES,
            );
            (api.memory_desc_get_size)(scratchpad)
        };
        let mut primitive = std::ptr::null_mut();
        let made = check(
            (api.primitive_create)(&mut primitive, desc),
            "primitive_create",
        );
        (api.primitive_desc_destroy)(desc);
        made?;
        Ok(Primitive {
            primitive,
            descs,
            scratchpad_bytes,
            has_bias: key.bias,
            implementation,
        })
    }
}
