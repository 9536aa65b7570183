// Native stack guard: the recursive parts of the engine (parser, evaluator, value printing)
// stop with an error before they could overflow the calling thread's stack, whatever its size.
#pragma once
#include <pthread.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace larder::jinja {

// Lowest address this thread's stack may reach, with a safety margin (0 when unknown).
// Computed once per thread: for the main thread glibc reads /proc/self/maps.
inline uintptr_t stack_floor() {
  thread_local uintptr_t floor = [] {
    pthread_attr_t attr;
    if (pthread_getattr_np(pthread_self(), &attr) != 0) return uintptr_t{0};
    void* addr = nullptr;
    size_t size = 0;
    int rc = pthread_attr_getstack(&attr, &addr, &size);
    pthread_attr_destroy(&attr);
    if (rc != 0 || !addr || !size) return uintptr_t{0};
    return reinterpret_cast<uintptr_t>(addr) + std::min<size_t>(256u << 10, size / 4);
  }();
  return floor;
}

inline bool stack_exhausted() { return reinterpret_cast<uintptr_t>(__builtin_frame_address(0)) < stack_floor(); }

}  // namespace larder::jinja
