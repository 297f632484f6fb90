//! The allocator of the `luna` binary: mimalloc.
//!
//! Every image allocates and frees buffers the size of its frame (a 4K RGB frame is 25 MB in
//! 8-bit, 100 MB as floats): the gateway's converted samples and encoded task, the saver's
//! decoded pixels. glibc's malloc gives blocks that large back to the OS as soon as they are
//! freed, so each frame faults fresh pages in again, and on a VM that costs more than copying
//! the frame; mimalloc reuses them (in the ComfyUI node bench, 46 ms became 34 ms for a 4K
//! frame).
//!
//! mimalloc returns freed memory to the OS after its purge delay (1 s by default). A longer one
//! (`MIMALLOC_PURGE_DELAY=60000`, read by mimalloc itself) keeps frame buffers warm between
//! prompts of a ComfyUI loop (node time at 1024x1024 in a real ComfyUI: median 10.0 ms with the
//! default, 7.9 ms with 60 s), but memory freed under a flood then stays with the process: with
//! 60 s, `luna up` peaked at 526 MiB in the fault suite's 50-client flood, over its 512 MiB
//! bound, so the default stays.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
