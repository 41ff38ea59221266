//! The subset of zlib-ng's (zlib-compatible) API that flate2 calls, served
//! by zlib-rs. The stream struct mirrors `libz-ng-sys` (allocator fields are
//! plain function pointers there, `Option`s in zlib-rs); both are
//! `#[repr(C)]` with the same layout, so a pointer to one is a pointer to
//! the other: `Option<fn>` uses the null niche and has the size of `fn`.
#![allow(non_camel_case_types, non_snake_case, clippy::missing_safety_doc)]

use std::os::raw::{c_char, c_int, c_uint, c_ulong, c_void};

use libz_rs_sys as rs;

pub type alloc_func = unsafe extern "C" fn(voidpf, uInt, uInt) -> voidpf;
pub type free_func = unsafe extern "C" fn(voidpf, voidpf);
pub type Bytef = u8;
pub type uInt = c_uint;
pub type uLong = c_ulong;
pub type voidpf = *mut c_void;
pub enum internal_state {}

#[repr(C)]
#[derive(Copy, Clone)]
pub struct z_stream {
    pub next_in: *mut Bytef,
    pub avail_in: uInt,
    pub total_in: c_ulong,
    pub next_out: *mut Bytef,
    pub avail_out: uInt,
    pub total_out: c_ulong,
    pub msg: *mut c_char,
    pub state: *mut internal_state,
    pub zalloc: alloc_func,
    pub zfree: free_func,
    pub opaque: voidpf,
    pub data_type: c_int,
    pub adler: c_ulong,
    pub reserved: uLong,
}
pub type z_streamp = *mut z_stream;

const _: () = assert!(std::mem::size_of::<z_stream>() == std::mem::size_of::<rs::z_stream>());

#[inline]
fn cast(s: z_streamp) -> *mut rs::z_stream {
    s.cast()
}

pub use rs::{
    Z_BLOCK, Z_BUF_ERROR, Z_DATA_ERROR, Z_DEFAULT_STRATEGY, Z_DEFLATED, Z_FINISH, Z_FULL_FLUSH, Z_MEM_ERROR,
    Z_NEED_DICT, Z_NO_FLUSH, Z_OK, Z_PARTIAL_FLUSH, Z_STREAM_END, Z_STREAM_ERROR, Z_SYNC_FLUSH,
};

pub unsafe extern "C" fn deflate(s: z_streamp, flush: c_int) -> c_int {
    unsafe { rs::deflate(cast(s), flush) }
}
pub unsafe extern "C" fn deflateEnd(s: z_streamp) -> c_int {
    unsafe { rs::deflateEnd(cast(s)) }
}
pub unsafe extern "C" fn deflateReset(s: z_streamp) -> c_int {
    unsafe { rs::deflateReset(cast(s)) }
}
pub unsafe extern "C" fn deflateParams(s: z_streamp, level: c_int, strategy: c_int) -> c_int {
    unsafe { rs::deflateParams(cast(s), level, strategy) }
}
pub unsafe extern "C" fn deflateSetDictionary(s: z_streamp, dict: *const Bytef, len: uInt) -> c_int {
    unsafe { rs::deflateSetDictionary(cast(s), dict, len) }
}
pub unsafe extern "C" fn deflateInit2_(
    s: z_streamp,
    level: c_int,
    method: c_int,
    window_bits: c_int,
    mem_level: c_int,
    strategy: c_int,
    version: *const c_char,
    stream_size: c_int,
) -> c_int {
    unsafe { rs::deflateInit2_(cast(s), level, method, window_bits, mem_level, strategy, version, stream_size) }
}
pub unsafe extern "C" fn inflate(s: z_streamp, flush: c_int) -> c_int {
    unsafe { rs::inflate(cast(s), flush) }
}
pub unsafe extern "C" fn inflateEnd(s: z_streamp) -> c_int {
    unsafe { rs::inflateEnd(cast(s)) }
}
pub unsafe extern "C" fn inflateReset(s: z_streamp) -> c_int {
    unsafe { rs::inflateReset(cast(s)) }
}
pub unsafe extern "C" fn inflateSetDictionary(s: z_streamp, dict: *const Bytef, len: uInt) -> c_int {
    unsafe { rs::inflateSetDictionary(cast(s), dict, len) }
}
pub unsafe extern "C" fn inflateInit2_(
    s: z_streamp,
    window_bits: c_int,
    version: *const c_char,
    stream_size: c_int,
) -> c_int {
    unsafe { rs::inflateInit2_(cast(s), window_bits, version, stream_size) }
}
pub unsafe extern "C" fn zlibVersion() -> *const c_char {
    rs::zlibVersion()
}
pub unsafe extern "C" fn inflateReset2(s: z_streamp, window_bits: c_int) -> c_int {
    unsafe { rs::inflateReset2(cast(s), window_bits) }
}
