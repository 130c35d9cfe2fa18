// Shared CPU threading helper of the compiled core (torch-free).
//
// With OpenMP (the default build on GCC/Clang when the compiler provides it), the
// work runs on the process's OpenMP thread team. PyTorch's CPU wheels link the same
// runtime (libgomp.so.1), and the loader maps one library per soname, so once torch
// is imported our parallel regions and torch's run on one pool. Without that, our
// threads and torch's spinning OpenMP workers (which wait busily for a while after
// every parallel op) competed for the same cores: on a 2-core machine a kernel run
// with 2 threads between two torch matmuls was no faster than with 1.
// Without OpenMP, a plain std::thread pool per call does the same job.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(DAO_USE_OPENMP)
#include <omp.h>
#endif

namespace dao {

// Runs fn(k) for k in [0, n) on up to num_threads threads, items handed out one at a
// time (callers order them largest first); the first exception is rethrown after all
// threads have finished, and no new item starts once one has thrown.
template <typename Fn>
void parallel_for(int64_t n, int num_threads, Fn&& fn) {
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n)));
    if (nt <= 1) {
        for (int64_t k = 0; k < n; ++k) fn(k);
        return;
    }
    std::mutex err_mutex;
    std::exception_ptr err;
    std::atomic<bool> failed{false};
    auto run = [&](int64_t k) {
        if (failed.load(std::memory_order_relaxed)) return;
        try {
            fn(k);
        } catch (...) {
            std::lock_guard<std::mutex> lock(err_mutex);
            if (!err) err = std::current_exception();
            failed = true;
        }
    };
#if defined(DAO_USE_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t k = 0; k < n; ++k) run(k);
#else
    std::atomic<int64_t> next{0};
    std::vector<std::thread> pool;
    for (int t = 0; t < nt; ++t) {
        pool.emplace_back([&] {
            for (int64_t k = next++; k < n; k = next++) run(k);
        });
    }
    for (auto& th : pool) th.join();
#endif
    if (err) std::rethrow_exception(err);
}

// Whether parallel_for runs on OpenMP (reported as dao._C.PARALLEL_BACKEND).
constexpr bool parallel_uses_openmp() {
#if defined(DAO_USE_OPENMP)
    return true;
#else
    return false;
#endif
}

}  // namespace dao
