// reg-ddp: CUDA-side helpers over c10 (the stream libtorch computes on, the current
// device, allocator statistics). Compiled against the CUDA runtime headers of the
// nvidia-cuda-runtime wheel; only called when CUDA is present. Failures (a bad device
// index, no driver) come back as strings (shim_error.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <memory>

#include "shim_error.h"

using reg_shim::guard;

extern "C" {

// The cudaStream_t libtorch queues work on for `device`: NCCL collectives go on it too,
// so they are ordered with the kernels that produce and consume their buffers.
char *reg_cuda_current_stream(int device, void **out) {
  return guard([&] { *out = static_cast<void *>(c10::cuda::getCurrentCUDAStream(device).stream()); });
}

// Makes `device` current on this thread (NCCL binds a communicator to the current device).
char *reg_cuda_set_device(int device) {
  return guard([&] { c10::cuda::set_device(static_cast<c10::DeviceIndex>(device)); });
}

// A stream of `device` for collectives that overlap with compute (one of libtorch's
// pooled streams: it lives as long as the process).
char *reg_cuda_side_stream(int device, void **out) {
  return guard([&] {
    *out = static_cast<void *>(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, static_cast<c10::DeviceIndex>(device)).stream());
  });
}

// Work queued on `waiting` from now on runs after the work queued so far on `on` (on
// the GPU; the host does not wait).
char *reg_cuda_stream_wait(int device, void *waiting, void *on) {
  return guard([&] {
    c10::cuda::CUDAGuard on_device(static_cast<c10::DeviceIndex>(device));
    at::cuda::CUDAEvent mark;
    mark.record(c10::cuda::getStreamFromExternal(static_cast<cudaStream_t>(on), static_cast<c10::DeviceIndex>(device)));
    mark.block(c10::cuda::getStreamFromExternal(static_cast<cudaStream_t>(waiting), static_cast<c10::DeviceIndex>(device)));
  });
}

// Waits for everything queued on libtorch's current stream of `device`.
char *reg_cuda_stream_sync(int device) {
  return guard([&] { c10::cuda::getCurrentCUDAStream(device).synchronize(); });
}

// Peak bytes held by tensors on `device` since the last reset.
char *reg_cuda_peak_allocated(int device, int64_t *out) {
  return guard([&] {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
    *out = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
  });
}

char *reg_cuda_reset_peak(int device) {
  return guard([&] { c10::cuda::CUDACachingAllocator::resetPeakStats(device); });
}

// A checkpoint's copy of device tensors into pinned host tensors, on a stream of its
// own so that it overlaps with the next step: it starts once the work queued so far on
// the current stream is done, and `done` marks its end.
struct RegHostCopy {
  at::cuda::CUDAEvent done;
};

char *reg_cuda_copy_to_host(int device, at::Tensor **src, at::Tensor **dst, int n, void **out) {
  return guard([&] {
    auto current = c10::cuda::getCurrentCUDAStream(device);
    auto side = c10::cuda::getStreamFromPool(false, static_cast<c10::DeviceIndex>(device));
    at::cuda::CUDAEvent ready;
    ready.record(current);
    ready.block(side);
    auto copy = std::make_unique<RegHostCopy>();
    {
      c10::cuda::CUDAStreamGuard on_side(side);
      for (int i = 0; i < n; ++i) dst[i]->copy_(*src[i], /*non_blocking=*/true);
    }
    copy->done.record(side);
    *out = copy.release();
  });
}

// The current stream waits (on the GPU, not the host) for the copy: before the
// optimiser overwrites what it reads.
char *reg_cuda_copy_order(int device, void *copy) {
  return guard([&] { static_cast<RegHostCopy *>(copy)->done.block(c10::cuda::getCurrentCUDAStream(device)); });
}

// The host waits for the copy (the writer thread, before it reads the pinned memory).
char *reg_cuda_copy_wait(void *copy) {
  return guard([&] { static_cast<RegHostCopy *>(copy)->done.synchronize(); });
}

void reg_cuda_copy_free(void *copy) { delete static_cast<RegHostCopy *>(copy); }
}
