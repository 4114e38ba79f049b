// The one thread pool every CPU kernel shares, created on first use and sized to the machine
// (DECODELAB_THREADS overrides; set_cpu_threads changes it between calls).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace decodelab::cpu {

class ThreadPool {
 public:
  static ThreadPool& instance();

  int size() const { return int(workers_.size()) + 1; }  // the calling thread works too
  void resize(int threads);

  // Runs task(i) for every i in [0, tasks) on the pool and the caller, and returns when all are
  // done. Tasks are handed out one at a time, so uneven tasks balance. The first exception a task
  // throws is rethrown here after the others finish. Not reentrant: tasks must not call it.
  void parallel_for(int64_t tasks, const std::function<void(int64_t)>& task);

  ~ThreadPool();

 private:
  explicit ThreadPool(int threads);
  void start(int threads);
  void stop();
  void work(uint64_t generation);
  void run_tasks();

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  uint64_t generation_ = 0;
  bool stopping_ = false;
  // The current job.
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t tasks_ = 0;
  int64_t next_ = 0;
  int busy_ = 0;
  std::exception_ptr error_;
  std::mutex call_mutex_;  // one parallel_for at a time
};

// Splits [0, n) into at most `parts` contiguous ranges of nearly equal size, multiples of `align`
// except the last; calls fn(begin, end) for each on the pool.
void parallel_ranges(int64_t n, int64_t align, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace decodelab::cpu
