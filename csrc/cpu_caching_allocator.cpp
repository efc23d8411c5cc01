// A caching allocator for CPU tensors: freed blocks of at least `min_block` bytes are kept and
// handed to a later request of about their size instead of going back to the operating
// system. glibc returns large blocks (mmap'ed, or the trimmed top of its heap) at once, so a
// training step that allocates the same activations every step faults their pages in again
// every step (about 170,000 page faults per SmolLM2-135M step at L=128); PyTorch's CUDA
// allocator caches for the same reason. Smaller requests go to the allocator it replaced.
//
// Size classes: a request of n bytes is rounded up to a multiple of 1/8 of the largest power of
// two <= n, and of the page size (from 32 KiB on, at most 12.5% more address space; pages past
// n are never touched, so they cost no memory). A request takes the smallest cached block of
// its class or a larger one up to twice its size. Freed bytes held in the cache are capped at
// `max_cached`; past the cap the largest cached blocks are freed first.
//
// Process-wide: it replaces c10's CPU allocator (c10::SetCPUAllocator) while enabled. Blocks
// handed out while enabled stay valid after disabling; freeing them then returns them to the
// system. A storage keeps the allocator that made it, so resizing such a tensor after disabling
// still comes here (served fresh, never from the cache): the allocator is never destroyed. Thread-safe (one mutex; CPU allocations of this size are rare next to their work).

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#include "error_text.h"

namespace quietstar {
namespace {

constexpr size_t kPage = 4096;

size_t size_class(size_t n) {
  const size_t power = size_t(1) << (63 - __builtin_clzll(n));
  const size_t step = std::max(power / 8, kPage);
  return (n + step - 1) / step * step;
}

class CachingCPUAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    c10::Allocator* fallback;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fallback = n < min_block_ || bypass_depth_ > 0 ? fallback_ : nullptr;
    }
    if (fallback != nullptr) return fallback->allocate(n);
    size_t size = size_class(n);
    void* block = take(&size);
    if (block == nullptr) block = fresh(size);
    std::lock_guard<std::mutex> lock(mutex_);
    live_[block] = size;
    live_bytes_ += size;
    report(block, static_cast<int64_t>(size));
    return {block, block, &CachingCPUAllocator::deleter, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &CachingCPUAllocator::deleter; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  void enable(int64_t max_cached, int64_t min_block) {
    TORCH_CHECK(max_cached >= 0, "max_cached_bytes must be >= 0, got ", number_text(max_cached));
    TORCH_CHECK(min_block > 0, "min_block_bytes must be > 0, got ", number_text(min_block));
    std::lock_guard<std::mutex> lock(mutex_);
    max_cached_ = static_cast<size_t>(max_cached);
    min_block_ = static_cast<size_t>(min_block);
    evict_to(max_cached_);
    if (enabled_) return;
    fallback_ = c10::GetCPUAllocator();
    c10::SetCPUAllocator(this, /*priority=*/0);
    TORCH_CHECK(c10::GetCPUAllocator() == this,
                "the CPU caching allocator could not replace the current CPU allocator (one with a higher priority "
                "is registered)");
    enabled_ = true;
  }

  void disable() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!enabled_) return;
    c10::SetCPUAllocator(fallback_, /*priority=*/0);
    enabled_ = false;
    evict_to(0);
  }

  // Between bypass(true) and its bypass(false), new requests go to the allocator it replaced
  // (one-off copies the cache should not keep once freed). Counted, so nested or overlapping
  // blocks (other threads) end only with the last; returns whether requests are bypassed now.
  bool bypass(bool on) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (on)
      ++bypass_depth_;
    else if (bypass_depth_ > 0)
      --bypass_depth_;
    return bypass_depth_ > 0;
  }

  // Frees every cached block (the blocks in use stay).
  void empty_cache() {
    std::lock_guard<std::mutex> lock(mutex_);
    evict_to(0);
  }

  // enabled, hits, misses, cached bytes, cached blocks, live bytes, live blocks
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t blocks = 0;
    for (const auto& [size, list] : cached_) blocks += static_cast<int64_t>(list.size());
    return {enabled_, hits_, misses_, static_cast<int64_t>(cached_bytes_), blocks, static_cast<int64_t>(live_bytes_),
            static_cast<int64_t>(live_.size())};
  }

 private:
  static void deleter(void* block);

  // The smallest cached block of this size class or a larger one up to twice the size (its
  // class in *size), or null (a miss). A larger block's pages are resident already: handing it
  // out keeps the footprint where a fresh block would add to it.
  void* take(size_t* size) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = cached_.lower_bound(*size); it != cached_.end() && it->first <= 2 * *size; ++it) {
      if (it->second.empty()) continue;
      void* block = it->second.back();
      it->second.pop_back();
      *size = it->first;
      cached_bytes_ -= it->first;
      ++hits_;
      return block;
    }
    ++misses_;
    return nullptr;
  }

  // A new block; if the system has no memory left, the cache is emptied and it asks again.
  void* fresh(size_t size) {
    void* block = nullptr;
    if (posix_memalign(&block, kPage, size) == 0) return block;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evict_to(0);
    }
    if (posix_memalign(&block, kPage, size) == 0) return block;
    throw std::bad_alloc();
  }

  void release(void* block) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = live_.find(block);
    if (it == live_.end()) {  // a small block from the fallback, freed through raw_deleter()
      fallback_->raw_deleter()(block);
      return;
    }
    const size_t size = it->second;
    live_.erase(it);
    live_bytes_ -= size;
    report(block, -static_cast<int64_t>(size));
    if (!enabled_ || size > max_cached_) {
      std::free(block);
      return;
    }
    cached_[size].push_back(block);
    cached_bytes_ += size;
    evict_to(max_cached_);
  }

  // Frees cached blocks, the largest first, until at most `limit` bytes are cached (mutex held).
  void evict_to(size_t limit) {
    while (cached_bytes_ > limit) {
      auto largest = std::prev(cached_.end());
      if (largest->second.empty()) {
        cached_.erase(largest);
        continue;
      }
      std::free(largest->second.back());
      largest->second.pop_back();
      cached_bytes_ -= largest->first;
    }
  }

  // The profiler's memory view (torch.profiler with profile_memory=True), as c10's allocator does.
  void report(void* block, int64_t delta) const {
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(block, delta, live_bytes_, live_bytes_ + cached_bytes_,
                                       c10::Device(c10::DeviceType::CPU));
  }

  std::mutex mutex_;
  c10::Allocator* fallback_ = nullptr;
  bool enabled_ = false;
  int64_t bypass_depth_ = 0;
  size_t max_cached_ = 0, min_block_ = 1 << 20, cached_bytes_ = 0, live_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
  std::map<size_t, std::vector<void*>> cached_;  // size class -> free blocks
  std::unordered_map<void*, size_t> live_;       // handed out -> size class
};

// Never destroyed: blocks it handed out may be freed at any time, up to the process's exit.
CachingCPUAllocator& allocator() {
  static auto* instance = new CachingCPUAllocator();
  return *instance;
}

void CachingCPUAllocator::deleter(void* block) { allocator().release(block); }

void cpu_caching_allocator_enable(int64_t max_cached_bytes, int64_t min_block_bytes) {
  allocator().enable(max_cached_bytes, min_block_bytes);
}

void cpu_caching_allocator_disable() { allocator().disable(); }

std::vector<int64_t> cpu_caching_allocator_stats() { return allocator().stats(); }

bool cpu_caching_allocator_bypass(bool on) { return allocator().bypass(on); }

void cpu_caching_allocator_empty_cache() { allocator().empty_cache(); }

}  // namespace
}  // namespace quietstar

TORCH_LIBRARY_FRAGMENT(quietstar, m) {
  m.def("cpu_caching_allocator_enable(int max_cached_bytes, int min_block_bytes) -> ()",
        &quietstar::cpu_caching_allocator_enable);
  m.def("cpu_caching_allocator_disable() -> ()", &quietstar::cpu_caching_allocator_disable);
  m.def("cpu_caching_allocator_stats() -> int[]", &quietstar::cpu_caching_allocator_stats);
  m.def("cpu_caching_allocator_bypass(bool on) -> bool", &quietstar::cpu_caching_allocator_bypass);
  m.def("cpu_caching_allocator_empty_cache() -> ()", &quietstar::cpu_caching_allocator_empty_cache);
}
