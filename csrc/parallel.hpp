// Shared CPU threading helper of the compiled core (torch-free).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace dao {

// Runs fn(k) for k in [0, n) on up to num_threads threads; the first exception
// is rethrown after all threads have joined.
template <typename Fn>
void parallel_for(int64_t n, int num_threads, Fn&& fn) {
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n)));
    if (nt <= 1) {
        for (int64_t k = 0; k < n; ++k) fn(k);
        return;
    }
    std::atomic<int64_t> next{0};
    std::mutex err_mutex;
    std::exception_ptr err;
    std::vector<std::thread> pool;
    for (int t = 0; t < nt; ++t) {
        pool.emplace_back([&] {
            try {
                for (int64_t k = next++; k < n; k = next++) fn(k);
            } catch (...) {
                std::lock_guard<std::mutex> lock(err_mutex);
                if (!err) err = std::current_exception();
                next = n;
            }
        });
    }
    for (auto& th : pool) th.join();
    if (err) std::rethrow_exception(err);
}

}  // namespace dao
