// reg-ddp: CUDA-side helpers over c10 (the stream libtorch computes on, allocator stats).
// Compiled against the CUDA runtime headers of the nvidia-cuda-runtime wheel; only
// called when CUDA is present.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <cstdint>

extern "C" {

// The cudaStream_t libtorch queues work on for `device`: NCCL collectives go on it too,
// so they are ordered with the kernels that produce and consume their buffers.
void *reg_cuda_current_stream(int device) {
  return static_cast<void *>(c10::cuda::getCurrentCUDAStream(device).stream());
}

// Peak bytes held by tensors on `device` since the last reset.
int64_t reg_cuda_peak_allocated(int device) {
  auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
  return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
}

void reg_cuda_reset_peak(int device) { c10::cuda::CUDACachingAllocator::resetPeakStats(device); }
}

extern "C" {
// Makes `device` current on this thread (NCCL binds a communicator to the current device).
void reg_cuda_set_device(int device) { c10::cuda::set_device(static_cast<c10::DeviceIndex>(device)); }

// Waits for everything queued on libtorch's current stream of `device`.
void reg_cuda_stream_sync(int device) { c10::cuda::getCurrentCUDAStream(device).synchronize(); }
}
