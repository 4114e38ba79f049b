#include "cpu/thread_pool.h"

#include <algorithm>
#include <cstdlib>
#include <string>

#include "decodelab/error.h"
#include "decodelab/router.h"

namespace decodelab {
namespace cpu {
namespace {

int default_threads() {
  if (const char* env = std::getenv("DECODELAB_THREADS"); env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    if (*end != '\0' || n < 1 || n > 1024) fail("thread pool", "DECODELAB_THREADS", "an integer in [1, 1024]", env);
    return int(n);
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

}  // namespace

ThreadPool& ThreadPool::instance() {
  static ThreadPool pool(default_threads());
  return pool;
}

ThreadPool::ThreadPool(int threads) { start(threads); }

ThreadPool::~ThreadPool() { stop(); }

void ThreadPool::start(int threads) {
  for (int i = 1; i < threads; ++i) {
    try {
      workers_.emplace_back([this, g = generation_] { work(g); });
    } catch (const std::system_error& e) {
      stop();
      fail("thread pool", "threads", std::to_string(threads) + " threads", std::string("a failure to start one: ") + e.what());
    }
  }
}

void ThreadPool::stop() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (std::thread& t : workers_) t.join();
  workers_.clear();
  stopping_ = false;
}

void ThreadPool::resize(int threads) {
  if (threads < 1 || threads > 1024) fail("set_cpu_threads", "threads", "[1, 1024]", std::to_string(threads));
  std::lock_guard call(call_mutex_);
  if (threads == size()) return;
  stop();
  start(threads);
}

void ThreadPool::run_tasks() {
  for (;;) {
    int64_t i;
    {
      std::lock_guard lock(mutex_);
      if (next_ >= tasks_) return;
      i = next_++;
    }
    try {
      (*task_)(i);
    } catch (...) {
      std::lock_guard lock(mutex_);
      if (!error_) error_ = std::current_exception();
      next_ = tasks_;  // stop handing out work
    }
  }
}

void ThreadPool::work(uint64_t seen) {
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
      ++busy_;
    }
    run_tasks();
    {
      std::lock_guard lock(mutex_);
      --busy_;
    }
    done_.notify_all();
  }
}

void ThreadPool::parallel_for(int64_t tasks, const std::function<void(int64_t)>& task) {
  if (tasks <= 0) return;
  std::lock_guard call(call_mutex_);
  if (workers_.empty() || tasks == 1) {
    for (int64_t i = 0; i < tasks; ++i) task(i);
    return;
  }
  {
    std::lock_guard lock(mutex_);
    task_ = &task;
    tasks_ = tasks;
    next_ = 0;
    error_ = nullptr;
    ++generation_;
  }
  wake_.notify_all();
  run_tasks();
  std::exception_ptr error;
  {
    // Workers that woke late find no task left; wait for those still running one.
    std::unique_lock lock(mutex_);
    done_.wait(lock, [&] { return busy_ == 0 && next_ >= tasks_; });
    task_ = nullptr;
    error = error_;
  }
  if (error) std::rethrow_exception(error);
}

void parallel_ranges(int64_t n, int64_t align, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const int64_t units = (n + align - 1) / align;
  const int64_t parts = std::min<int64_t>(units, ThreadPool::instance().size());
  ThreadPool::instance().parallel_for(parts, [&](int64_t p) {
    const int64_t begin = std::min(n, (units * p / parts) * align);
    const int64_t end = std::min(n, (units * (p + 1) / parts) * align);
    if (begin < end) fn(begin, end);
  });
}

}  // namespace cpu

void set_cpu_threads(int threads) { cpu::ThreadPool::instance().resize(threads); }
int cpu_threads() { return cpu::ThreadPool::instance().size(); }

}  // namespace decodelab
