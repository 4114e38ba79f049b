// The shared CPU thread pool: every task runs exactly once, errors come back to the caller,
// resizing works between calls, and the ranges helper covers [0, n) without overlap.
#include <gtest/gtest.h>

#include <atomic>
#include <vector>

#include "cpu/thread_pool.h"
#include "decodelab/error.h"
#include "decodelab/router.h"

namespace decodelab::cpu {
namespace {

TEST(ThreadPool, RunsEveryTaskOnce) {
  for (int64_t tasks : {int64_t{1}, int64_t{2}, int64_t{7}, int64_t{1000}}) {
    std::vector<std::atomic<int>> seen(static_cast<size_t>(tasks));
    ThreadPool::instance().parallel_for(tasks, [&](int64_t i) { seen[size_t(i)]++; });
    for (auto& s : seen) EXPECT_EQ(s.load(), 1);
  }
}

TEST(ThreadPool, RethrowsTheFirstErrorAfterTheOthersFinish) {
  std::atomic<int> ran{0};
  EXPECT_THROW(ThreadPool::instance().parallel_for(64, [&](int64_t i) {
    ran++;
    if (i == 3) throw Error("task 3 failed");
  }), Error);
  EXPECT_GE(ran.load(), 1);
  // The pool is usable afterwards.
  std::atomic<int> after{0};
  ThreadPool::instance().parallel_for(10, [&](int64_t) { after++; });
  EXPECT_EQ(after.load(), 10);
}

TEST(ThreadPool, ResizesBetweenCalls) {
  const int before = cpu_threads();
  set_cpu_threads(3);
  EXPECT_EQ(cpu_threads(), 3);
  std::atomic<int> count{0};
  ThreadPool::instance().parallel_for(100, [&](int64_t) { count++; });
  EXPECT_EQ(count.load(), 100);
  set_cpu_threads(before);
  EXPECT_EQ(cpu_threads(), before);
  EXPECT_THROW(set_cpu_threads(0), Error);
}

TEST(ThreadPool, RangesCoverEverythingOnceAligned) {
  for (int64_t n : {int64_t{1}, int64_t{5}, int64_t{64}, int64_t{1001}}) {
    std::vector<std::atomic<int>> seen(static_cast<size_t>(n));
    parallel_ranges(n, 16, [&](int64_t begin, int64_t end) {
      EXPECT_EQ(begin % 16, 0);
      for (int64_t i = begin; i < end; ++i) seen[size_t(i)]++;
    });
    for (auto& s : seen) EXPECT_EQ(s.load(), 1);
  }
}

}  // namespace
}  // namespace decodelab::cpu
